"""``itmkit serve``: the retrievals of one or several runs in a web page and a JSON API, each run
loaded once and kept in memory (``training.searcher.Retriever``).

    itmkit serve runs/vsepp [runs/cimn ...] [--host 127.0.0.1] [--port 8765] [--split test]
                 [--shortlist RUN2 --topk K] [--block-images N] [--weights W]

The page (``training/serve.html``, served at ``/``) needs nothing from outside: a query box,
the top-k images of every run side by side with their region boxes and label names, the query's
parse (unknown words marked, the scene graph), the captions of a clicked image, captions for an
uploaded image. The API is under ``/api`` and described at ``/docs`` (``/openapi.json``).

Safe by default: it binds 127.0.0.1 (another host gets a warning: anyone who reaches it can
query the runs and read the split's images and captions); a query is at most ``MAX_QUERY``
characters and k at most ``MAX_K`` (422 otherwise); images are addressed by their id in the
split, never by a path; an upload is at most ``MAX_UPLOAD`` bytes, decoded in memory under the
extractor's bad-image policy (a non-image is refused with 400) and written nowhere; the page
sets every text as text. No endpoint writes; what is written (a two-tower run's export and its
FAISS index, RUN/index-SPLIT) is written at startup, as ``itmkit retrieve`` writes it.
"""

import argparse
import html
import io
import ipaddress
import random
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import add_quiet_argument, add_threads_arguments, positive_int
from pipeline.images import BadImage, open_image
from pipeline.labels import LabelNames
from pipeline.shards import ShardError
from training import models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.index import INDEXES, IndexConfig
from training.queries import RetrieveError
from training.run import add_run_arguments
from training.searcher import Retriever, SearchConfig

MAX_QUERY = 1000            # characters of a text query
MAX_K = 100                 # results per query
MAX_UPLOAD = 10 * 2 ** 20   # bytes of an uploaded image
THUMB = 320                 # longest side of a thumbnail, pixels
BOXES = 6                   # region boxes shown per image: the most confident
PAGE = Path(__file__).with_name("serve.html")


# ---------------------------------------------------------------------------------------------
# what the page shows of a run and of an image

@dataclass
class Served:
    """A run as served: its retriever, and how an uploaded image is extracted for it."""
    name: str
    retriever: Retriever
    bounded: str | None = None       # cross-attention without a shortlist: the gallery bound (shown)
    weights: str | None = None       # extractor weights for uploads (None: uploads refused)
    seed: int | None = None

    def __post_init__(self):
        data = self.retriever.data
        self.rows = {int(i): n for n, i in enumerate(data.image_ids)}
        attrs = data.shards[0].attrs if data.shards else {}
        self.labels = LabelNames.for_extractor(attrs.get("extractor"))
        self.extractor_weights = str(attrs.get("weights", ""))
        if self.weights is None and str(attrs.get("weights_sha256", "")).startswith("random-seed-") \
                and "extractor" in attrs:
            self.weights = "random"   # the shards were extracted with random weights: the seed is recorded
        self._regions: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def info(self) -> dict:
        r = self.retriever
        method = r.searcher("images").method
        how = method["method"]
        if how == "shortlist":
            first = Path(method["shortlist_run"]).name
            how = f"{method['shortlist']['method']} top {method['topk']} of {first}, re-scored"
        return {"name": self.name, "dir": str(r.run.dir), "model": r.model_name,
                "two_tower": bool(r.run.model.two_tower), "reads_graph": r.reads_graph,
                "dataset": r.run.config.dataset, "split": r.data.cfg.split, "checkpoint": r.run.which,
                "images": r.gallery_size("images"), "captions": r.gallery_size("captions"),
                "method": how, "bounded": self.bounded, "uploads": self.weights is not None,
                "random_weights": self.extractor_weights if self.extractor_weights.startswith("RANDOM")
                else None}

    def regions(self, image_id: int) -> dict:
        """The image's size, file name and its ``BOXES`` most confident regions with label names
        (cached: the page asks for them with every result)."""
        with self._lock:
            if image_id in self._regions:
                self._regions.move_to_end(image_id)
                return self._regions[image_id]
        data = self.retriever.data
        k, row = data.loc[self.rows[image_id]]
        r = data.shards[k].get(int(row))
        out = []
        if r.boxes is not None and len(r.boxes) and not np.isnan(r.boxes).any():
            scores = np.zeros(len(r.boxes)) if r.obj_scores is None else np.nan_to_num(r.obj_scores, nan=0.0)
            for i in np.argsort(-scores, kind="stable")[:BOXES]:
                label = "" if r.obj_labels is None else self.labels.region(
                    r.obj_labels[i], -1 if r.attr_labels is None else r.attr_labels[i])
                out.append({"box": [round(float(v), 1) for v in r.boxes[i]], "label": label,
                            "score": float(scores[i])})
        path = self.retriever.paths.get(image_id)
        info = {"image_id": image_id, "height": int(r.image_hw[0]), "width": int(r.image_hw[1]),
                "file": None if path is None else Path(path).name, "regions": out}
        with self._lock:
            self._regions[image_id] = info
            if len(self._regions) > 4096:
                self._regions.popitem(last=False)
        return info

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of the image at most ``THUMB`` pixels a side (decoded under the bad-image
        policy), or a grey one of its shape saying why there is none."""
        path = self.retriever.image_file(image_id)
        why = "image file not found"
        if path is not None:
            try:
                with open_image(path) as im:
                    im.draft("RGB", (THUMB, THUMB))   # JPEG: decode at a reduced scale
                    im = im.convert("RGB")
                    im.thumbnail((THUMB, THUMB))
                    return jpeg(im)
            except (BadImage, OSError, ValueError):
                why = "image file unreadable"
        h, w = self.regions(image_id)["height"], self.regions(image_id)["width"]
        scale = THUMB / max(h, w, 1)
        im = Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), (200, 200, 200))
        ImageDraw.Draw(im).text((6, 6), why, fill=(60, 60, 60))
        return jpeg(im)


def jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def bound_note(images: int, total: int) -> str | None:
    if images >= total:
        return None
    return (f"block scoring of the first {images} of the split's {total} images (and their captions); "
            "give --shortlist RUN2 to search all of them")


# ---------------------------------------------------------------------------------------------
# the app

ERRORS = (ShardError, CheckpointError, RetrieveError, ValueError, OSError)   # one line, exit 1


def make_app(runs: list[Served]):
    """The FastAPI app over ``runs`` (loaded and warmed by the caller)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, Response

    app = FastAPI(title="itmkit serve", version="1", docs_url=None, redoc_url=None,
                  description="Retrievals of trained image-text matching runs. Read-only.")
    rng = random.Random()
    page = PAGE.read_text()

    def served(run: int) -> Served:
        if not 0 <= run < len(runs):
            raise HTTPException(404, f"no run {run}: there are {len(runs)}")
        return runs[run]

    def answer(s: Served, ask) -> dict:
        """One run's answer to a query, or its error as text (another run may answer)."""
        t0 = time.perf_counter()
        try:
            out = ask(s.retriever)
        except (RetrieveError, ShardError, ValueError) as e:
            return {"run": s.name, "error": str(e)}
        out["ms"] = round(1000 * (time.perf_counter() - t0), 2)
        if out["gallery"] == "images":
            for r in out["results"]:
                r.update(s.regions(r["image_id"]))
        return {**out, "run": s.name}

    def everyone(ask) -> dict:
        answers = [answer(s, ask) for s in runs]
        if all("error" in a for a in answers):
            raise HTTPException(400, answers[0]["error"])
        return {"runs": answers}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": (
            "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; form-action 'self'")})

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs():
        return HTMLResponse(api_page(app.openapi()))

    @app.get("/api/runs", summary="the runs served, the limits of a query")
    def list_runs():
        return {"runs": [s.info() for s in runs], "max_query": MAX_QUERY, "max_k": MAX_K,
                "max_upload": MAX_UPLOAD}

    @app.get("/api/search", summary="the top-k images of a text (or of a caption of the split) for every run")
    def search(q: str | None = Query(None, min_length=1, max_length=MAX_QUERY, description="a text"),
               caption_id: int | None = Query(None, description="a caption of the split: its image is "
                                                                 "marked"),
               k: int = Query(10, ge=1, le=MAX_K)):
        if (q is None) == (caption_id is None):
            raise HTTPException(400, "give one of q (a text) and caption_id")
        if q is not None:
            return everyone(lambda r: r.search_text(q, k))
        return everyone(lambda r: r.search_caption(caption_id, k))

    @app.get("/api/example", summary="a caption of the searched gallery drawn at random")
    def example(run: int = 0):
        r = served(run).retriever
        caption_id = int(rng.choice(r.data.text.caption_ids))
        return {"caption_id": caption_id, "text": r.texts[caption_id]}

    @app.get("/api/images/{image_id}",
             summary="an image of the split: its regions and, per run, its top-k captions")
    def image(image_id: int, run: int = 0, k: int = Query(10, ge=1, le=MAX_K)):
        s = served(run)
        if image_id not in s.rows:
            raise HTTPException(404, f"no image {image_id} in the split {s.retriever.data.cfg.split} "
                                     f"of {s.name}")
        return {"image": s.regions(image_id), **everyone(lambda r: r.search_image(image_id, k))}

    @app.get("/api/images/{image_id}/thumb", summary="a JPEG thumbnail of an image of the split",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def thumb(image_id: int, run: int = 0):
        s = served(run)
        if image_id not in s.rows:
            raise HTTPException(404, f"no image {image_id} in the split of {s.name}")
        return Response(s.thumbnail(image_id), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/upload", summary="the top-k captions of an uploaded image (the request body), per run",
              description=f"At most {MAX_UPLOAD} bytes; the image is extracted with each run's extractor "
                          "config and weights, in memory.")
    async def upload(request: Request, k: int = Query(10, ge=1, le=MAX_K),
                     name: str = Query("upload", max_length=200,
                                       description="the file's name, for messages")):
        if int(request.headers.get("content-length") or 0) > MAX_UPLOAD:
            raise HTTPException(413, f"the upload is over {MAX_UPLOAD} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD:
                raise HTTPException(413, f"the upload is over {MAX_UPLOAD} bytes")
        if not body:
            raise HTTPException(400, "the request body is empty: send the image's bytes")
        try:   # refused here, once, rather than by every run
            with open_image(io.BytesIO(bytes(body))):
                pass
        except BadImage as e:
            raise HTTPException(400, f"{name}: {e}") from None
        if not any(s.weights for s in runs):
            raise HTTPException(400, "uploads need the extractor weights the dataset was extracted with: "
                                     "start itmkit serve with --weights")

        def ask(s: Served):
            if s.weights is None:
                return {"run": s.name, "error": "uploads need --weights"}
            return answer(s, lambda r: r.search_image(io.BytesIO(bytes(body)), k, s.weights, s.seed, name))

        from starlette.concurrency import run_in_threadpool
        return {"runs": [await run_in_threadpool(ask, s) for s in runs]}

    return app


def api_page(spec: dict) -> str:
    """The OpenAPI description as one page with no outside resources (FastAPI's own pages load
    their scripts from a CDN)."""
    e = html.escape
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = "".join(
                f"<li><code>{e(p['name'])}</code> ({e(p['in'])}{', required' if p.get('required') else ''}): "
                f"{e(_type(p.get('schema', {})))} "
                f"{e(_limits(p.get('schema', {})))} {e(p.get('description', ''))}</li>"
                for p in op.get("parameters", []))
            rows.append(f"<h2><code>{e(method.upper())} {e(path)}</code></h2><p>{e(op.get('summary', ''))}</p>"
                        f"<p>{e(op.get('description', ''))}</p><ul>{params}</ul>")
    return ("<!doctype html><meta charset=utf-8><title>itmkit serve: API</title>"
            "<style>body{font:14px system-ui,sans-serif;max-width:60em;margin:2em auto}</style>"
            f"<h1>{e(spec['info']['title'])} API</h1><p>{e(spec['info'].get('description', ''))} "
            "The machine-readable description: <a href=\"/openapi.json\">/openapi.json</a>. "
            "The page: <a href=\"/\">/</a>.</p>" + "".join(rows))


def _type(schema: dict) -> str:
    """``integer``, or ``integer, optional`` for FastAPI's ``anyOf`` with null."""
    types = [s.get("type", "") for s in schema.get("anyOf", [schema])]
    return ", ".join(t for t in types if t != "null") + (", optional" if "null" in types else "")


def _limits(schema: dict) -> str:
    for s in [schema, *schema.get("anyOf", [])]:
        found = [f"{k} {s[k]}" for k in ("minimum", "maximum", "minLength", "maxLength", "default") if k in s]
        if found:
            return "(" + ", ".join(found) + ")"
    return ""


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = IndexConfig()
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders written by itmkit train (several: side by side)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (an address other than loopback is reachable by others: a warning "
                        "is printed)")
    p.add_argument("--port", type=int, default=8765, help="port")
    p.add_argument("--split", default="test", help="the split searched")
    add_run_arguments(p)
    p.add_argument("--index", choices=list(INDEXES), default=d.kind, help="two-tower runs: the FAISS index")
    p.add_argument("--shortlist", metavar="RUN2", default=None,
                   help="cross-attention runs: a two-tower run of the same dataset whose top --topk they "
                        "re-score")
    p.add_argument("--topk", type=positive_int, default=100, help="shortlist length")
    p.add_argument("--block-images", type=positive_int, default=1000, metavar="N",
                   help="cross-attention runs without --shortlist score the first N images of the split "
                        "(and their captions), block by block")
    p.add_argument("--weights", default=None,
                   help="extractor weights of the dataset, for uploaded images (default: 'random' when the "
                        "shards were extracted with random weights, else uploads are refused)")
    p.add_argument("--seed", type=int, default=None, help="seed of random weights (default: the recorded one)")
    add_threads_arguments(p)
    add_quiet_argument(p)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_runs(args) -> list[Served]:
    served, names = [], [Path(r).name for r in args.runs]
    for run_dir, name in zip(args.runs, names):
        cross = not models.get(RunConfig.load(run_dir).model).two_tower
        shortlist = args.shortlist if cross else None
        limit = args.block_images if cross and shortlist is None else None
        cfg = SearchConfig(args.split, limit, args.checkpoint, args.device, IndexConfig(args.index),
                           shortlist=shortlist, topk=args.topk, workers=args.workers or 0, progress=False)
        r = Retriever(run_dir, args.root, cfg).warm()
        total = len(r.paths) if limit else 0
        name = name if names.count(name) == 1 else str(run_dir)
        served.append(Served(name, r, bound_note(limit, total) if limit else None, args.weights, args.seed))
    return served


def command(args) -> int:
    import uvicorn

    if not is_loopback(args.host):
        print(f"serve: warning: binding {args.host}, not loopback: anyone who reaches it can query the "
              "runs and read the split's images and captions", file=sys.stderr)
    t0 = time.perf_counter()
    runs = load_runs(args)
    app = make_app(runs)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if not args.quiet:
        print(f"serve: {len(runs)} run(s) loaded in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{s.name} ({s.retriever.model_name}, {s.info()['images']} images)" for s in runs))
    url = f"http://{host}:{args.port}"
    print(f"serve: {url}/  (API: {url}/docs; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
