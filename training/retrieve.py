"""Search a trained run: a text against the images of a split, an image against its captions.

    python training/retrieve.py RUN --query "a red car next to a brown dog" [-k 10] [--split test]
    python training/retrieve.py RUN --caption-id N       # a dataset caption: its image is marked
    python training/retrieve.py RUN --image-id N         # top-k captions: the image's own are marked
    python training/retrieve.py RUN --image PATH --weights W   # an image that is not in the dataset
           [--json] [--index flat|ivf|hnsw] [--shortlist RUN2 --topk K [--fuse ALPHA]] [--max-images N]

A query takes the run's own text path: it is parsed by the scene-graph parser with the spaCy
model the dataset's graph shards record (tokens for every model, the graph for those that read
it), then encoded with the run's vocabulary by ``encode_graph``, as its training captions were.
A dataset caption (``--caption-id``) uses its row of the graph shards.

Two-tower runs search a FAISS index over the split's embeddings, exported once by
``training/export.py`` to ``<run>/index-<split>/`` and reused while current: an exact
inner-product index by default, IVF or HNSW for large galleries (built once, cached next to the
export). Cross-attention runs score the gallery block by block (``score_rows``, which also
scores a given subset of rows: ``--shortlist RUN2 --topk K`` re-scores a two-tower run's top K,
ordered as ``itmkit evaluate --shortlist`` orders a query's candidates, ``training/shortlist.py``).

``--image`` is the one place where training reaches into features (``file_query`` imports it):
the image is extracted with the extractor config the split's region (and grid) shards record,
after checking that ``--weights`` is the extractor those shards were made with.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from pipeline.config import UsageError, add_quiet_argument, add_threads_arguments, positive_int, run_command
from pipeline import shards
from pipeline.images import BadImage
from pipeline.shards import Layout, ShardError
from training import models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.data import (CaptionDataset, ImageDataset, ShardData, caption_item, collate_images,
                           collate_text, encode_graph, image_item, make_loader)
from training.export import export_run, read_index
from training.run import LoadedRun, add_run_arguments, load_run
from training.shortlist import order_candidates, top_k as best_columns


class RetrieveError(ValueError):
    """A query or an option that cannot be served (unknown id, a run of the wrong kind, ...)."""


# ---------------------------------------------------------------------------------------------
# queries

@dataclass
class Query:
    kind: str                         # text | caption | image | file
    graph: dict | None = None         # text queries: the graph-table row (tokens, objects, ...)
    image: dict | None = None         # image queries: the item ImageDataset gives
    text: str | None = None
    caption_id: int | None = None
    image_id: int | None = None
    path: str | None = None
    truth: set = field(default_factory=set)   # ids of the gallery items that are the ground truth
    notes: list = field(default_factory=list)

    @property
    def gallery(self) -> str:
        return "images" if self.graph is not None else "captions"

    def describe(self) -> dict:
        return {k: v for k, v in (("kind", self.kind), ("text", self.text), ("caption_id", self.caption_id),
                                  ("image_id", self.image_id), ("path", self.path)) if v is not None}


def query_batch(run: LoadedRun, query: Query):
    """The query as a batch of one, through ``run``'s own vocabulary and caption length."""
    if query.graph is None:
        return collate_images([query.image])
    ids, objects, attributes, relations = encode_graph(query.graph, run.vocab, run.config.max_len)
    arr = lambda rows, width: np.asarray(rows, np.int32).reshape(-1, width)  # noqa: E731
    return collate_text([caption_item(-1, -1, np.asarray(ids, np.int32), arr(objects, 2),
                                      arr(attributes, 3), arr(relations, 3))])


def query_parser(layout: Layout) -> tuple[Callable[[str], dict], list[str]]:
    """text -> graph-table row, parsed with the spaCy model the dataset's graph shards record;
    and notes on anything that differs from how those shards were parsed."""
    from pipeline import parse, sgparse   # spaCy takes seconds to import: only for text queries

    files = layout.index.files("graphs")
    recorded = (shards.table_metadata(files[0]).get("config") or {}) if files else {}
    notes = []
    if "model" not in recorded:
        model = sgparse.resolve_model(sgparse.DEFAULT_MODEL)
        notes.append(f"{files[0] if files else layout.dir}: the graph shards record no parser config; "
                     f"the query is parsed with spaCy's {model}")
    else:
        model = recorded["model"]
        now = parse.ParseConfig(model=model, chunk_size=recorded.get("chunk_size", 5000)).identity()
        diff = [f"{k} {recorded.get(k)} -> {v}" for k, v in now.items() if recorded.get(k) != v]
        if diff:
            notes.append("the parser differs from the one the graph shards were written with ("
                         + ", ".join(diff) + "): the query's graph may differ from a caption's")
    nlp = sgparse.load_model(model)
    return lambda text: next(sgparse.parse_texts(nlp, [text])).row(-1), notes


def text_query(run: LoadedRun, text: str, parse: Callable[[str], dict] | None = None) -> Query:
    if not text.strip():
        raise RetrieveError("the query is empty")
    notes = []
    if parse is None:
        parse, notes = query_parser(Layout(run.root, run.config.dataset))
    graph = parse(text)
    if not graph["tokens"]:
        raise RetrieveError(f"the query {text!r} has no words")
    unknown = sorted({t.lower() for t in graph["tokens"][:run.config.max_len - 2]} - set(run.vocab.stoi))
    if unknown:
        notes.append(f"not in the run's vocabulary (read as <unk>): {', '.join(unknown)}")
    return Query("text", graph=graph, text=text, notes=notes)


def _not_searched(table_path: Path, kind: str, column: str, value: int, data: ShardData) -> RetrieveError:
    """Why id ``value`` is not in the split's gallery: no such id, another split, or left out."""
    table = shards.read_table(table_path, kind, [column, "split"])
    hit = table.filter(pc.equal(table[column], value))
    split = data.cfg.split
    if not hit.num_rows:
        return RetrieveError(f"no {column} {value} in {table_path}")
    other = hit["split"][0].as_py()
    if other != split:
        return RetrieveError(f"{column} {value} is in split '{other}', not '{split}' (pass --split {other})")
    first = f" of its first {data.cfg.max_images} images" if data.cfg.max_images else ""
    return RetrieveError(f"{column} {value} is in split '{split}' but not searched: the search covers "
                         f"the first {data.cfg.captions_per_image} captions of each image{first}")


def caption_query(run: LoadedRun, caption_id: int) -> Query:
    """A caption of the split, with its row of the graph shards; its image is the ground truth."""
    data, layout = run.data, Layout(run.root, run.config.dataset)
    where = np.flatnonzero(data.text.caption_ids == caption_id)
    if not len(where):
        raise _not_searched(layout.captions, "captions", "caption_id", caption_id, data)
    graph = None
    for path in layout.index.files("graphs"):
        table = shards.read_table(path, "graphs")
        table = table.filter(pc.equal(table["caption_id"], caption_id))
        if table.num_rows:
            graph = table.to_pylist()[0]
            break
    if graph is None:
        raise ShardError(f"caption_id {caption_id} has no row in the graph shards; "
                         "rerun python -m pipeline parse")
    captions = shards.read_table(layout.captions, "captions", ["caption_id", "text"])
    text = captions.filter(pc.equal(captions["caption_id"], caption_id))["text"][0].as_py()
    image_id = int(data.text.image_ids[where[0]])
    return Query("caption", graph=graph, text=text, caption_id=caption_id, image_id=image_id,
                 truth={image_id})


def image_query(run: LoadedRun, image_id: int) -> Query:
    """An image of the split; its captions in the split are the ground truth."""
    data = run.data
    where = np.flatnonzero(data.image_ids == image_id)
    if not len(where):
        layout = Layout(run.root, run.config.dataset)
        raise _not_searched(layout.images, "images", "image_id", image_id, data)
    truth = {int(c) for c, i in zip(data.text.caption_ids, data.text.image_ids) if i == image_id}
    return Query("image", image=data.image(int(where[0])), image_id=image_id, truth=truth)


def file_query(run: LoadedRun, path, weights: str, seed: int | None = None, device="cpu") -> Query:
    """An image file that is not in the dataset, extracted on the fly as the split's shards were.
    The one place training reaches into features: imported here, not at module level."""
    from features.single import check_weights, extract_image, recorded_config
    from features.weights import RANDOM, WeightsError

    data, notes = run.data, []
    kinds = ("regions", "grid") if data.grid_loc is not None else ("regions",)
    attrs = {"regions": data.shards[0].attrs}
    if "grid" in kinds:
        attrs["grid"] = data.grid_shards[0].attrs
    paths = {"regions": data.shards[0].path, "grid": data.grid_shards[0].path if data.grid_shards else None}
    try:
        cfgs = {k: recorded_config(attrs[k], paths[k]) for k in kinds}
        if weights == RANDOM and seed is None:   # the seed the shards were extracted with
            found = re.fullmatch(r"random-seed-(\d+)", str(attrs["regions"].get("weights_sha256", "")))
            seed = int(found.group(1)) if found else 0
        seed = 0 if seed is None else seed
        for k in kinds:
            check_weights(cfgs[k], k, weights, seed, attrs[k]["config_hash"], paths[k])
        cfg = cfgs["regions"]
        if cfg.boxes == "given":
            notes.append("the dataset's regions were extracted on given boxes; this image has none, "
                         "so the detector chooses its boxes (boxes=adaptive)")
            cfg = type(cfg).from_dict({**cfg.to_dict(), "boxes": "adaptive"})
        if "grid" in kinds and cfgs["grid"].settings_for("grid") != cfg.settings_for("grid"):
            out = extract_image(path, cfg, weights, seed, device, ("regions",))
            grid = extract_image(path, cfgs["grid"], weights, seed, device, ("grid",))
            out.grid, out.grid_hw = grid.grid, grid.grid_hw
        else:
            out = extract_image(path, cfg, weights, seed, device, kinds)
    except WeightsError as e:
        raise RetrieveError(str(e)) from None
    except BadImage as e:
        raise RetrieveError(f"{path}: {e}") from None
    if out.note:
        notes.append(f"{path}: {out.note}")
    if out.weights.is_random:
        notes.append(f"extractor weights {out.weights.description}")
    item = image_item(out.regions)
    if out.grid is not None:
        item["grid"], item["grid_hw"] = out.grid, tuple(out.grid_hw)
    return Query("file", image=item, path=str(path), notes=notes)


# ---------------------------------------------------------------------------------------------
# the two galleries of a split, and scoring a query against gallery rows block by block

@dataclass(frozen=True)
class Side:
    dataset: type
    collate: Callable
    encode_gallery: str                  # the model's encoder of gallery items
    encode_query: str                    # ... and of queries
    scores: Callable                     # (model, gallery enc, query enc) -> [Q, n]
    ids: Callable[[ShardData], np.ndarray]
    export: str                          # the export's array of these embeddings (read_index)
    export_ids: str
    block: int                           # items per block, in units of the image batch size


SIDES = {
    "images": Side(ImageDataset, collate_images, "encode_image", "encode_text",
                   lambda m, g, q: m.similarity(g, q).t(), lambda d: d.image_ids, "images", "image_ids", 1),
    "captions": Side(CaptionDataset, collate_text, "encode_text", "encode_image",
                     lambda m, g, q: m.similarity(q, g), lambda d: d.text.caption_ids, "captions",
                     "caption_ids", 5),
}


@torch.no_grad()
def score_rows(model, query, side: str, data: ShardData, rows=None, *, batch_size: int = 128,
               workers: int = 0, device="cpu", progress: bool = True) -> np.ndarray:
    """[Q, n] scores of a batch of Q queries (a ``TextBatch`` against ``side="images"``, an
    ``ImageBatch`` against ``"captions"``) on the gallery rows ``rows`` of ``data`` (all when
    None), in that order. Gallery items are read, encoded and scored one block at a time (as
    ``compute_sims`` does), so memory is bounded by the block size whatever the gallery size."""
    s = SIDES[side]
    dataset = s.dataset(data) if rows is None else Subset(s.dataset(data), [int(r) for r in rows])
    loader = make_loader(dataset, s.collate, batch_size * s.block, workers=workers)
    q = getattr(model, s.encode_query)(query.to(device))
    out = [s.scores(model, getattr(model, s.encode_gallery)(batch.to(device)), q).float().cpu()
           for batch in tqdm(loader, desc=f"score {side}", unit="block", leave=False,
                             disable=not progress or len(loader) < 2)]
    return torch.cat(out, 1).numpy() if out else np.zeros((len(query), 0), np.float32)


@dataclass
class Ranking:
    rows: np.ndarray         # gallery rows, best first
    scores: np.ndarray
    rescored: int = -1       # shortlist: how many of the top rows the second run re-scored


def top_k(scores: np.ndarray, k: int) -> Ranking:
    """Best first; ties keep gallery order."""
    order = best_columns(scores[None], k)[0]
    return Ranking(order, scores[order])


class BlockSearch:
    """A run scores every gallery row (or given rows) against the query: cross-attention runs."""

    def __init__(self, run: LoadedRun, side: str, *, batch_size: int = 128, workers: int = 0,
                 progress: bool = True):
        self.run, self.side = run, side
        self.kw = dict(batch_size=batch_size, workers=workers, progress=progress,
                       device=next(run.model.parameters()).device)
        self.method = {"method": "blocks", "block": batch_size * SIDES[side].block}

    def scores(self, query: Query, rows=None) -> np.ndarray:
        return score_rows(self.run.model, query_batch(self.run, query), self.side, self.run.data,
                          rows, **self.kw)[0]

    def search(self, query: Query, k: int) -> Ranking:
        return top_k(self.scores(query), k)


# ---------------------------------------------------------------------------------------------
# FAISS indexes over a two-tower run's exported embeddings

@dataclass
class IndexConfig:
    kind: str = "flat"            # flat (exact) | ivf | hnsw
    nlist: int = 0                # ivf: clusters; 0 = sqrt(N), at most N / 39
    nprobe: int = 8               # ivf: clusters searched per query
    hnsw_m: int = 32              # hnsw: links per node
    ef_construction: int = 80     # hnsw: candidates kept while building
    ef_search: int = 64           # hnsw: candidates kept while searching


@dataclass(frozen=True)
class IndexKind:
    build: Callable[[np.ndarray, IndexConfig], "faiss.Index"]
    tune: Callable[["faiss.Index", IndexConfig], None]     # search-time settings
    build_fields: tuple[str, ...]                          # IndexConfig fields the built index depends on
    cached: bool                                           # worth writing to disk


def ivf_lists(n: int, nlist: int = 0) -> int:
    if nlist > n:
        raise RetrieveError(f"--nlist {nlist} is more than the {n} vectors of the gallery")
    return nlist or max(1, min(round(n ** 0.5), n // 39))


def _flat(x: np.ndarray, cfg: IndexConfig):
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index


def _ivf(x: np.ndarray, cfg: IndexConfig):
    nlist = ivf_lists(len(x), cfg.nlist)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(x.shape[1]), x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    if nlist == 1:    # a gallery under 39 vectors: one list, nothing to cluster (FAISS would warn)
        index.cp.min_points_per_centroid = 1
    index.train(x)
    index.add(x)
    return index


def _hnsw(x: np.ndarray, cfg: IndexConfig):
    index = faiss.IndexHNSWFlat(x.shape[1], cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = cfg.ef_construction
    index.add(x)
    return index


def _tune_ivf(index, cfg: IndexConfig) -> None:
    index.nprobe = min(cfg.nprobe, index.nlist)


def _tune_hnsw(index, cfg: IndexConfig) -> None:
    index.hnsw.efSearch = cfg.ef_search


INDEXES = {
    "flat": IndexKind(_flat, lambda index, cfg: None, (), cached=False),
    "ivf": IndexKind(_ivf, _tune_ivf, ("nlist",), cached=True),
    "hnsw": IndexKind(_hnsw, _tune_hnsw, ("hnsw_m", "ef_construction"), cached=True),
}


def build_index(vectors: np.ndarray, cfg: IndexConfig):
    """A FAISS index of ``cfg.kind`` over float32 ``vectors`` [N, D], tuned for searching."""
    kind = INDEXES[cfg.kind]
    index = kind.build(np.ascontiguousarray(vectors, np.float32), cfg)
    kind.tune(index, cfg)
    return index


def open_index(vectors: np.ndarray, cfg: IndexConfig, cache: Path | None, source: dict):
    """``build_index``, or the one cached at ``cache`` (+ ``.json``) when it was built with the
    same settings from the same ``source`` (the export's identity). Returns (index, how)."""
    kind = INDEXES[cfg.kind]
    key = {"kind": cfg.kind, **{f: getattr(cfg, f) for f in kind.build_fields}, "source": source}
    side_file = None if cache is None else cache.with_name(cache.name + ".json")
    unreadable = ""
    if kind.cached and cache is not None and cache.exists() and side_file.exists() \
            and shards.read_json(side_file) == key:
        try:
            index = faiss.read_index(str(cache))
        except RuntimeError:   # truncated or damaged; FAISS's own message names its C++ source
            unreadable = "could not be read: truncated or damaged"
        else:
            if index.ntotal == len(vectors):
                kind.tune(index, cfg)
                return index, f"cached {cache.name}"
            unreadable = f"holds {index.ntotal} vectors, not {len(vectors)}"
    index = build_index(vectors, cfg)
    if kind.cached and cache is not None:
        with shards.atomic_path(cache) as tmp:
            faiss.write_index(index, str(tmp))
        shards.write_json(side_file, key)
        if unreadable:
            return index, f"rebuilt and cached {cache.name} (the cached one {unreadable})"
        return index, f"built and cached {cache.name}"
    return index, "built"


def index_dir(run: LoadedRun) -> Path:
    cfg = run.data.cfg
    return run.dir / (f"index-{cfg.split}" + (f"-first{cfg.max_images}" if cfg.max_images else ""))


class IndexSearch:
    """A two-tower run: the split's exported embeddings of ``side`` in a FAISS index."""

    def __init__(self, run: LoadedRun, side: str, cfg: IndexConfig, out_dir=None, *,
                 batch_size: int = 128, workers: int = 0, progress: bool = True):
        s = SIDES[side]
        self.run, self.side, self.cfg = run, side, cfg
        out_dir = Path(out_dir) if out_dir else index_dir(run)
        _, self.export_note = export_run(run, out_dir, batch_size=batch_size, workers=workers,
                                         progress=progress)
        export = read_index(out_dir)
        if not np.array_equal(export[s.export_ids], s.ids(run.data)):
            raise RetrieveError(f"{out_dir}: the exported {side} are not the split's "
                                f"({len(export[s.export_ids])} vs {len(s.ids(run.data))}); "
                                "remove the folder to export again")
        meta = export["meta"]
        source = {k: meta[k] for k in ("created", "checkpoint_sha256", "split", "max_images")}
        cache = out_dir / f"faiss-{side}-{cfg.kind}.index"
        self.index, how = open_index(export[s.export], cfg, cache, source)
        self.method = {"method": f"faiss-{cfg.kind}", "index": how, "export": str(out_dir),
                       **{f: getattr(cfg, f) for f in ("nlist", "nprobe") if cfg.kind == "ivf"},
                       **{f: getattr(cfg, f) for f in ("hnsw_m", "ef_construction", "ef_search")
                          if cfg.kind == "hnsw"}}
        if cfg.kind == "ivf":
            self.method["nlist"] = int(self.index.nlist)

    @torch.no_grad()
    def embed(self, query: Query) -> np.ndarray:
        model, device = self.run.model, next(self.run.model.parameters()).device
        enc = getattr(model, SIDES[self.side].encode_query)(query_batch(self.run, query).to(device))
        return enc.float().cpu().numpy()

    def search(self, query: Query, k: int) -> Ranking:
        x, n = self.embed(query), self.index.ntotal
        k = min(k, n)
        # ask for more until the k-th score is not repeated past the end of what came back, so
        # that equal scores at the cut are decided by gallery order, not by FAISS's heap
        want = min(k + 1, n)
        while True:
            scores, rows = self.index.search(x, want)
            scores, rows = scores[0][rows[0] >= 0], rows[0][rows[0] >= 0]   # IVF/HNSW may find fewer
            if want == n or len(scores) < want or k == 0 or scores[-1] < scores[k - 1]:
                break
            want = min(2 * want, n)
        order = np.lexsort((rows, -scores))[:k]                         # equal scores: gallery order
        return Ranking(rows[order], scores[order])


class ShortlistSearch:
    """A two-tower run shortlists the top ``topk``, the cross-attention run re-scores them and
    they are ordered as an evaluation's shortlist is (``training.shortlist.order_candidates``;
    ``fuse``: by the fused scores, which are shown); below them, the rest in the two-tower run's
    order and scores."""

    def __init__(self, rescore: BlockSearch, shortlist: IndexSearch, topk: int, fuse: float | None = None):
        a, b = rescore.run, shortlist.run
        s = SIDES[rescore.side]
        if a.config.dataset != b.config.dataset or not np.array_equal(s.ids(a.data), s.ids(b.data)):
            raise RetrieveError(f"--shortlist {b.dir}: its gallery ({b.config.dataset}, "
                                f"{len(s.ids(b.data))} {rescore.side}) is not the run's "
                                f"({a.config.dataset}, {len(s.ids(a.data))})")
        self.rescore, self.shortlist, self.topk, self.fuse = rescore, shortlist, topk, fuse
        self.method = {"method": "shortlist", "shortlist_run": str(b.dir), "topk": topk, "fuse": fuse,
                       "shortlist": shortlist.method, "rescore": rescore.method}

    def search(self, query: Query, k: int) -> Ranking:
        first = self.shortlist.search(query, max(k, self.topk))
        cand = first.rows[:self.topk]
        order, scores = order_candidates(self.rescore.scores(query, cand)[None],
                                         first.scores[None, :len(cand)], self.fuse)
        rows = np.concatenate([cand[order[0]], first.rows[self.topk:]])[:k]
        return Ranking(rows, np.concatenate([scores[0], first.scores[self.topk:]])[:k],
                       rescored=min(len(cand), k))


# ---------------------------------------------------------------------------------------------
# results

def result_rows(run: LoadedRun, side: str, ranking: Ranking, truth: set) -> list[dict]:
    data, layout = run.data, Layout(run.root, run.config.dataset)
    rows = [int(r) for r in ranking.rows]
    if side == "images":
        ids = [int(data.image_ids[r]) for r in rows]
        table = shards.read_table(layout.images, "images", ["image_id", "path"])
        table = table.filter(pc.is_in(table["image_id"], value_set=_int64(ids)))
        paths = dict(zip(table["image_id"].to_pylist(), table["path"].to_pylist()))
        out = [{"image_id": i, "path": paths.get(i)} for i in ids]
    else:
        ids = [int(data.text.caption_ids[r]) for r in rows]
        table = shards.read_table(layout.captions, "captions", ["caption_id", "text"])
        table = table.filter(pc.is_in(table["caption_id"], value_set=_int64(ids)))
        texts = dict(zip(table["caption_id"].to_pylist(), table["text"].to_pylist()))
        out = [{"caption_id": c, "image_id": int(data.text.image_ids[r]), "text": texts.get(c)}
               for c, r in zip(ids, rows)]
    key = "image_id" if side == "images" else "caption_id"
    for rank, (row, score) in enumerate(zip(out, ranking.scores), 1):
        row.update(rank=rank, score=float(score), ground_truth=row[key] in truth)
        if ranking.rescored >= 0:
            row["rescored"] = rank <= ranking.rescored
    return out


def _int64(values):
    return pa.array(values, pa.int64())


# the table's columns per gallery: (result key, width, number format)
COLUMNS = {"images": (("rank", 4, ""), ("image_id", 8, ""), ("score", 8, ".4f"), ("path", 0, "")),
           "captions": (("rank", 4, ""), ("caption_id", 10, ""), ("image_id", 8, ""), ("score", 8, ".4f"),
                        ("text", 0, ""))}


def format_text(result: dict) -> str:
    q, side = result["query"], result["gallery"]
    what = {"text": "", "caption": f" [caption {q.get('caption_id')} of image {q.get('image_id')}]",
            "image": f" [image {q.get('image_id')}]", "file": f" [{q.get('path')}]"}[q["kind"]]
    lines = [f"query{what}: {q['text']}" if "text" in q else f"query{what}"]
    columns = COLUMNS[side]
    lines.append("  ".join(f"{name:>{width}}" for name, width, _ in columns))
    lines += ["  ".join(f"{r[name]:>{width}{fmt}}" for name, width, fmt in columns)
              + ("  <- ground truth" if r["ground_truth"] else "") for r in result["results"]]
    if any(not r.get("rescored", True) for r in result["results"]):
        first = next(r["rank"] for r in result["results"] if not r["rescored"])
        lines.append(f"(from rank {first} on: not re-scored, the shortlisting run's order and scores)")
    if result["truth"] and not any(r["ground_truth"] for r in result["results"]):
        truth = ", ".join(map(str, result["truth"]))
        lines.append(f"ground truth ({side} {truth}) not in the top {result['k']}")
    m, sec = result["search"], result["seconds"]
    how = m["method"]
    if how == "shortlist":
        how += f" of {m['shortlist']['method']}'s top {m['topk']}" + (
            f", fused at {m['fuse']:g} (scores: fused)" if m.get("fuse") is not None else "")
    lines.append(f"retrieve: {result['run']} ({result['model']}, {result['checkpoint']}.pt) on "
                 f"{result['dataset']}/{result['split']}: top {len(result['results'])} of "
                 f"{result['gallery_size']} {side} by {how}; {sec['search']:.3f} s per query "
                 f"(load {sec['load']:.1f} s, index {sec['index']:.1f} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = IndexConfig()
    p.add_argument("run", help="run folder written by itmkit train")
    q = p.add_argument_group("the query (one of)")
    q.add_argument("--query", help="a text: the top-k images")
    q.add_argument("--caption-id", type=int, help="a caption of the split: the top-k images, its own marked")
    q.add_argument("--image-id", type=int, help="an image of the split: the top-k captions, its own marked")
    q.add_argument("--image", metavar="PATH", help="an image file not in the dataset (needs --weights): "
                   "the top-k captions")
    p.add_argument("-k", type=positive_int, default=10, help="results to show")
    p.add_argument("--split", default="test", help="the split searched")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="search only the first N images of the split and their captions (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_run_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per scoring or export block, captions: 5x")
    add_threads_arguments(p)
    add_quiet_argument(p)
    f = p.add_argument_group("two-tower runs: the FAISS index")
    f.add_argument("--index", choices=list(INDEXES), default=d.kind,
                   help="flat: exact inner product; ivf, hnsw: approximate, for large galleries")
    f.add_argument("--index-dir", default=None,
                   help="where the embeddings are exported and indexes cached (default: RUN/index-SPLIT)")
    f.add_argument("--nlist", type=int, default=d.nlist, help="ivf: clusters, 0 = sqrt(N) (at most N/39)")
    f.add_argument("--nprobe", type=positive_int, default=d.nprobe, help="ivf: clusters searched")
    f.add_argument("--hnsw-m", type=positive_int, default=d.hnsw_m, help="hnsw: links per node")
    f.add_argument("--ef-construction", type=positive_int, default=d.ef_construction,
                   help="hnsw: build-time candidate list")
    f.add_argument("--ef-search", type=positive_int, default=d.ef_search, help="hnsw: search-time candidate list")
    s = p.add_argument_group("cross-attention runs: shortlist and re-score")
    s.add_argument("--shortlist", metavar="RUN2", default=None,
                   help="a two-tower run of the same dataset (its best.pt) whose top --topk the "
                        "run re-scores (default: none, the run scores the whole gallery)")
    s.add_argument("--topk", type=positive_int, default=100, help="shortlist length")
    s.add_argument("--fuse", type=float, default=None, metavar="ALPHA",
                   help="rank the shortlist by ALPHA * run + (1 - ALPHA) * RUN2, both standardised over "
                        "the query's candidates (default: none, the run's scores alone)")
    e = p.add_argument_group("--image: extraction")
    e.add_argument("--weights", default=None,
                   help="extractor weights the dataset was extracted with, or 'random' (default: none)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of random weights (default: the one the shards record)")


def check_args(args) -> None:
    modes = [m for m in ("query", "caption_id", "image_id", "image") if getattr(args, m) is not None]
    if len(modes) != 1:
        raise UsageError("give one query: --query TEXT, --caption-id N, --image-id N or --image PATH")
    if args.query is not None and not args.query.strip():
        raise UsageError("--query is empty")
    if args.fuse is not None and (args.shortlist is None or not 0.0 <= args.fuse <= 1.0):
        raise UsageError(f"--fuse {args.fuse}: needs --shortlist RUN2 and a weight in [0, 1]")
    if args.image is not None and args.weights is None:
        raise UsageError("--image needs --weights: the extractor weights the dataset was extracted "
                         "with (a file, or 'random')")


def searcher(run: LoadedRun, side: str, args, root) -> BlockSearch | IndexSearch | ShortlistSearch:
    cfg = IndexConfig(args.index, args.nlist, args.nprobe, args.hnsw_m, args.ef_construction, args.ef_search)
    kw = dict(batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    if run.model.two_tower:
        return IndexSearch(run, side, cfg, args.index_dir, **kw)
    blocks = BlockSearch(run, side, **kw)
    if args.shortlist is None:
        return blocks
    first = load_run(args.shortlist, root, which="best", device=args.device, split=args.split,
                     max_images=args.max_images)
    return ShortlistSearch(blocks, IndexSearch(first, side, cfg, None, **kw), args.topk, args.fuse)


def retrieve(args) -> dict:
    config = RunConfig.load(args.run)
    two_tower = models.get(config.model).two_tower
    if args.shortlist is not None:
        if two_tower:
            raise RetrieveError(f"--shortlist: {args.run} is a two-tower run ({config.model}), which "
                                "searches its own index; --shortlist serves cross-attention runs")
        other = RunConfig.load(args.shortlist)
        if not models.get(other.model).two_tower:
            raise RetrieveError(f"--shortlist {args.shortlist}: {other.model} is a cross-attention model; "
                                "the shortlist comes from a two-tower run (vsepp, cimn)")
    t0 = time.perf_counter()
    run = load_run(args.run, args.root, which=args.checkpoint, device=args.device, split=args.split,
                   max_images=args.max_images)
    if args.query is not None:
        query = text_query(run, args.query)
    elif args.caption_id is not None:
        query = caption_query(run, args.caption_id)
    elif args.image_id is not None:
        query = image_query(run, args.image_id)
    else:
        query = file_query(run, args.image, args.weights, args.seed, args.device)
    t1 = time.perf_counter()
    search = searcher(run, query.gallery, args, args.root)
    t2 = time.perf_counter()
    ranking = search.search(query, args.k)
    t3 = time.perf_counter()
    rebuilt = [m["index"] for m in (search.method, search.method.get("shortlist") or {})
               if str(m.get("index", "")).startswith("rebuilt")]   # a damaged FAISS cache, said once
    return {"run": str(run.dir), "model": run.config.model, "checkpoint": run.which,
            "dataset": run.config.dataset, "split": run.data.cfg.split, "query": query.describe(),
            "gallery": query.gallery, "gallery_size": len(SIDES[query.gallery].ids(run.data)),
            "k": args.k, "truth": sorted(query.truth), "search": search.method,
            "results": result_rows(run, query.gallery, ranking, query.truth), "notes": query.notes + rebuilt,
            "seconds": {"load": t1 - t0, "index": t2 - t1, "search": t3 - t2}}


ERRORS = (ShardError, CheckpointError, RetrieveError, ValueError, OSError)   # one line, exit 1


def main(argv=None) -> int:
    """``itmkit retrieve`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    check_args(args)
    result = retrieve(args)
    for note in result["notes"]:
        print(f"retrieve: note: {note}", file=sys.stderr)
    print(json.dumps(result) if args.json else format_text(result))
    return 0


if __name__ == "__main__":   # python training/retrieve.py ...: the same as itmkit retrieve ...
    from itmkit.cli import main as itmkit

    sys.exit(itmkit(["retrieve", *sys.argv[1:]]))
