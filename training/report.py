"""One self-contained HTML report of trained runs: what they were trained on, how, how well, and
what they retrieve.

    itmkit report runs/NAME [runs/OTHER ...] [--out report.html] [--split test]   # or: python training/report.py ...

The file needs nothing but a browser: images are embedded as JPEG thumbnails and the training
curves as a PNG, all as data: URIs; no script, font or style sheet is fetched. Per run: the data
and shard provenance (the extractor weights, loudly when RANDOM; extractor and parser config
hashes), the recipe (the run's config), recalls per protocol next to chance (from eval.json, or
computed here when it has none for the split), training curves, then results on the split: text
queries with their top images (the ground truth framed), images with their top captions, the
worst failures (ground truth ranked lowest) and, on datasets that have them, hard-negative pairs
with both scores. Every shown image has its region boxes drawn with the object and attribute
names of the region shard. The queries are drawn with --seed from the split, so the reports of
runs on one split show the same queries. Several runs also get one comparison table.

The similarity matrix is read from <run>/sims-<split>.npz (evaluate.py --save-sims) when it was
computed from the loaded checkpoint (its sha256) and covers the split, else computed; so are the
recalls of eval.json: an entry that scored other weights (an earlier best.pt, say, before the run
was resumed) is left out and the recalls are computed for the report, which says so. Nothing in
the run folder is changed.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from pipeline import shards
from pipeline.config import (ArgumentParser, HelpFormatter, add_quiet_argument, add_threads_arguments,
                             non_negative_int, positive_int, run_command)
from pipeline.labels import LabelNames
from pipeline.manifest import dataset_defaults
from pipeline.shards import Layout, ShardError
from training import plot
from training.checkpoint import CheckpointError
from training.data import ShardData, eval_loaders, hard_negative_pairs
from training.evaluate import load_sims, sims_path
from training.evaluation import (chance_metrics, compute_sims, hard_negative_accuracy, i2t_ranks,
                                 protocol_result, t2i_ranks)
from training.run import LoadedRun, add_run_arguments, load_run
from training.shortlist import top_k

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324"]
PER = 5   # captions per image (the loader's captions_per_image)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by itmkit train")
    p.add_argument("--out", default=None, help="HTML file to write (default: <first run>/report.html)")
    p.add_argument("--split", default="test", help="split whose results are shown")
    add_run_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per block when the similarities are computed")
    add_threads_arguments(p)
    p.add_argument("--queries", type=positive_int, default=10, help="text queries and image queries shown, each")
    p.add_argument("--top", type=positive_int, default=5, help="results shown per query")
    p.add_argument("--failures", type=non_negative_int, default=5, help="worst failures shown per direction")
    p.add_argument("--pairs", type=non_negative_int, default=10, help="hard-negative pairs shown")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of queries")
    p.add_argument("--thumb", type=positive_int, default=160,
                   help="longest side of the image thumbnails, pixels")
    p.add_argument("--boxes", type=non_negative_int, default=6,
                   help="region boxes drawn per image, best object score first")
    add_quiet_argument(p)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_arguments(p)
    return p



# ---------------------------------------------------------------------------------------------
# the split of one run: similarities, captions, images and their regions

def split_sims(run: LoadedRun, split: str, batch_size: int, workers: int,
               device, progress: bool = True) -> tuple[np.ndarray, str]:
    """The [images, captions] similarities of the run's split and where they come from."""
    data, saved = run.data, sims_path(run.dir, split)
    why = ""
    if saved.exists():
        s = load_sims(saved)
        if "checkpoint_sha256" not in s:   # written by an earlier version
            why = f" ({saved.name} does not record the weights it holds the similarities of)"
        elif str(s["checkpoint_sha256"]) != run.scored["sha256"]:
            why = f" ({saved.name} holds the similarities of other weights)"
        elif (np.array_equal(s["image_ids"], data.image_ids)
                and np.array_equal(s["caption_ids"], data.text.caption_ids)):
            return s["sims"], f"read from {saved.name}"
    images, texts = eval_loaders(data, batch_size, workers)
    return compute_sims(run.model, images, texts, device, progress=progress), f"computed from {run.which}.pt{why}"


@dataclass
class Gallery:
    """What the results show of a split: caption texts, image files and region labels, and the
    thumbnails (made once per image)."""

    layout: Layout
    data: ShardData        # the split: ids, and region shards (boxes, labels) read for the images shown
    texts: dict            # caption id -> text, of the split
    paths: dict            # image id -> image file, of the split
    names: LabelNames
    thumb: int = 160
    boxes: int = 6
    _cache: dict = field(default_factory=dict)

    @classmethod
    def open(cls, run: LoadedRun, thumb: int, boxes: int) -> "Gallery":
        data, layout = run.data, Layout(run.root, run.config.dataset)
        split = data.cfg.split
        cap = shards.read_table(layout.captions, "captions", ["caption_id", "split", "text"])
        cap = cap.filter(pc.equal(cap["split"], split))
        img = shards.read_table(layout.images, "images", ["image_id", "path", "split"])
        img = img.filter(pc.equal(img["split"], split))
        extractor = data.shards[0].attrs.get("extractor") if data.shards else None
        return cls(layout, data, dict(zip(cap["caption_id"].to_pylist(), cap["text"].to_pylist())),
                   dict(zip(img["image_id"].to_pylist(), img["path"].to_pylist())),
                   LabelNames.for_extractor(extractor), thumb, boxes)

    @property
    def image_ids(self) -> np.ndarray:
        return self.data.image_ids

    @property
    def caption_ids(self) -> np.ndarray:
        return self.data.text.caption_ids

    def text(self, j: int) -> str:
        return self.texts.get(int(self.caption_ids[j]), "")

    def image_file(self, i: int) -> Path | None:
        """The image's file; a relative path is taken from the working directory, else from the
        dataset folder."""
        path = self.paths.get(int(self.image_ids[i]))
        if not path:
            return None
        for p in (Path(path), self.layout.dir / path):
            if p.is_file():
                return p
        return None

    def labelled(self, i: int) -> tuple[str, list[tuple[str, str, float]]]:
        """The thumbnail of image row ``i`` as a data: URI, its region boxes drawn, and the
        legend: (colour, ``attribute object`` name, object score) per drawn box."""
        if i not in self._cache:
            self._cache[i] = self._draw(i)
        return self._cache[i]

    def file_name(self, i: int) -> str:
        """The name of image row ``i``'s file as images.parquet gives it ("" when it has none:
        features imported without images)."""
        return Path(self.paths.get(int(self.image_ids[i])) or "").name

    def _image(self, i: int, w: int, h: int) -> Image.Image:
        """The image, or a grey one saying why not (no file: features imported without images,
        or a copy of the dataset without them) of its size, or of the thumbnail's when the size
        is not known either (precomp features record 0 x 0)."""
        path = self.image_file(i)
        why = "image file not found" if self.file_name(i) else "no image (features imported without images)"
        if path is not None:
            try:
                with Image.open(path) as f:
                    return f.convert("RGB")
            except (OSError, Image.DecompressionBombError):
                why = "image file unreadable"
        im = Image.new("RGB", (w, h) if w > 0 and h > 0 else (self.thumb, self.thumb * 3 // 4), (200, 200, 200))
        ImageDraw.Draw(im).text((4, 4), why, fill=(60, 60, 60))
        return im

    def _draw(self, i: int):
        k, row = self.data.loc[i]
        r = self.data.shards[k].get(int(row))
        h, w = r.image_hw
        im = self._image(i, w, h)
        scale = self.thumb / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                       Image.BILINEAR)
        draw, font = ImageDraw.Draw(im), ImageFont.load_default(size=10)
        legend, boxes = [], []
        known = w > 0 and h > 0 and r.boxes is not None and len(r.boxes) and not np.isnan(r.boxes).any()
        best = np.argsort(-np.nan_to_num(r.obj_scores, nan=0.0), kind="stable")
        for n, k in enumerate(best[:self.boxes] if known else []):
            colour = PALETTE[n % len(PALETTE)]
            box = [float(v) for v in r.boxes[k] * ([im.width / w, im.height / h] * 2)]
            draw.rectangle(box, outline=colour, width=2)
            name = self.names.region(r.obj_labels[k], r.attr_labels[k])
            boxes.append((box, colour, fitted(name, im.width - 4, lambda t: draw.textlength(t, font=font))))
            legend.append((colour, name, float(r.obj_scores[k])))
        sizes = [(draw.textlength(text, font=font), LABEL_HEIGHT) for _, _, text in boxes]
        for (_, colour, text), at in zip(boxes, place_labels([b for b, _, _ in boxes], sizes, im.size)):
            if at is not None:   # no free place on the thumbnail: the legend names it
                draw.text(at, text, fill="white", font=font, stroke_width=2, stroke_fill=colour)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), legend


LABEL_HEIGHT = 12   # pixels of a 10-pixel label with its 2-pixel outline


def fitted(text: str, width: float, length) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels (``length(text)``: its width)."""
    if length(text) <= width:
        return text
    while text and length(text + "…") > width:
        text = text[:-1]
    return text + "…"


def place_labels(boxes: list, sizes: list, image: tuple[int, int]) -> list:
    """Where to write each box's label on an image of ``image`` (width, height): the top-left
    (x, y) of a ``sizes`` (width, height) rectangle inside the image that overlaps no label
    placed before it (boxes come best first), tried inside the box's top edge, above it, inside
    its bottom edge, below it; None when none of them is free."""
    placed, out = [], []
    W, H = image
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        x = max(0.0, min(x1 + 2, W - w - 1))
        spot = None
        for y in (y1 + 1, y1 - h - 1, y2 - h - 1, y2 + 1):
            rect = (x, y, x + w, y + h)
            if y >= 0 and y + h <= H and x + w <= W and not any(overlap(rect, o) for o in placed):
                spot = (x, y)
                placed.append(rect)
                break
        out.append(spot)
    return out


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ---------------------------------------------------------------------------------------------
# what is shown: the queries and their results, chosen from the matrix alone

def pick(n: int, k: int, seed: int, stream: int) -> np.ndarray:
    """``k`` of ``n`` rows drawn with ``seed`` (one stream per kind of query): the same rows for
    every run scored on the same split."""
    return np.random.default_rng([seed, stream]).choice(n, size=min(k, n), replace=False)


@dataclass
class Results:
    text_queries: list     # {"caption", "gt", "gt_rank", "gt_score", "hits": [(image row, score)]}
    image_queries: list    # {"image", "gt_rank", "hits": [(caption col, score)]}
    t2i_failures: list     # as text_queries, worst ground-truth rank first
    i2t_failures: list     # as image_queries
    pairs: list            # {"kind", "a", "b", "scores": [(caption col, score with a, score with b)]}


def text_query(sims, j: int, rank: int, k: int) -> dict:
    col = sims[:, j]
    return {"caption": j, "gt": j // PER, "gt_rank": int(rank), "gt_score": float(col[j // PER]),
            "hits": [(int(i), float(col[i])) for i in top_k(col[None], k)[0]]}


def image_query(sims, i: int, rank: int, k: int) -> dict:
    row = sims[i]
    return {"image": i, "gt_rank": int(rank), "hits": [(int(j), float(row[j])) for j in top_k(row[None], k)[0]]}


def results(sims: np.ndarray, image_ids, pairs: list[dict], *, queries: int, k: int, failures: int,
            n_pairs: int, seed: int) -> Results:
    """Caption j belongs to image row j // 5 (the loader's order). Ranks count ties against the
    model, as the recalls do."""
    t2i, i2t = t2i_ranks(sims, PER), i2t_ranks(sims, PER)
    worst_t2i = np.argsort(-t2i, kind="stable")[:failures]
    worst_i2t = np.argsort(-i2t, kind="stable")[:failures]
    row = {int(x): n for n, x in enumerate(image_ids)}
    pairs = sorted((p for p in pairs if int(p["image_id"]) in row and int(p["partner_id"]) in row),
                   key=lambda p: (p["kind"], int(p["image_id"]), int(p["partner_id"])))
    shown = [pairs[n] for n in sorted(pick(len(pairs), n_pairs, seed, 2))]
    pair_rows = []
    for p in shown:
        a, b = row[int(p["image_id"])], row[int(p["partner_id"])]
        scores = [(j, float(sims[a, j]), float(sims[b, j])) for j in (a * PER, b * PER)]
        pair_rows.append({"kind": p["kind"], "a": a, "b": b, "scores": scores})
    return Results(
        [text_query(sims, int(j), t2i[j], k) for j in pick(sims.shape[1], queries, seed, 0)],
        [image_query(sims, int(i), i2t[i], k) for i in pick(sims.shape[0], queries, seed, 1)],
        [text_query(sims, int(j), t2i[j], k) for j in worst_t2i],
        [image_query(sims, int(i), i2t[i], k) for i in worst_i2t],
        pair_rows)


# ---------------------------------------------------------------------------------------------
# the numbers: recalls next to chance, provenance, recipe

def evaluation(run: LoadedRun, split: str, sims: np.ndarray, pairs: list[dict]) -> tuple[dict, str]:
    """The run's eval.json entries of ``split`` ({protocol: entry}), or, when it has none, those
    of the default protocols computed from ``sims``; and where they come from."""
    path = run.dir / "eval.json"
    saved = shards.read_json(path) if path.exists() else {}
    mine = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{split}/")}
    fresh = {k: v for k, v in mine.items() if v.get("checkpoint", {}).get("sha256") == run.scored["sha256"]}
    stale = stale_note(mine, fresh, run)
    if fresh:
        return fresh, f"from {path.name}" + (f" ({stale})" if stale else "")
    out = {}
    for protocol in dataset_defaults(run.root, run.config.dataset).protocols:
        try:
            out[protocol] = protocol_result(sims, protocol, image_ids=run.data.image_ids,
                                            caption_ids=run.data.text.caption_ids)[0]
        except ValueError:   # e.g. coco-1k on fewer images than a fold
            continue
    if pairs:
        out["hard_negatives"] = hard_negative_accuracy(sims, run.data.image_ids, pairs)
    why = f"{path.name}: {stale}" if stale else f"{path.name} has no '{split}/' entry"
    return out, f"computed for this report ({why})"


def stale_note(entries: dict, fresh: dict, run: LoadedRun) -> str:
    """What a report says of the eval.json entries left out: they scored other weights."""
    stale = {k: v.get("checkpoint") for k, v in entries.items() if k not in fresh}
    if not stale:
        return ""
    what = sorted({f"{c['file']} of epoch {c['epoch']}" if c else "weights it does not record"
                   for c in stale.values()})
    return (f"left out {', '.join(sorted(stale))}: scored {' and '.join(what)}, not the "
            f"{run.scored['file']} of epoch {run.scored['epoch']} loaded here")


def chance_size(entry: dict) -> int:
    """The number of images the entry's chance rSum is for (a fold's for coco-1k)."""
    n = int(entry["images"])
    if "chance_rsum" not in entry:
        return n
    lo, hi = 1, n   # chance rSum falls as the images grow
    while lo < hi:
        mid = (lo + hi) // 2
        if chance_metrics(mid)["rsum"] > entry["chance_rsum"] + 1e-6:
            lo = mid + 1
        else:
            hi = mid
    return lo


def provenance(run: LoadedRun) -> dict:
    """Where the run's data comes from: per kind of shard it read, the config hash it recorded
    and what shards.json holds now; the extractor's weights and settings from the region shards'
    attributes; the parser from the graph tables' metadata."""
    layout = Layout(run.root, run.config.dataset)
    index = layout.index
    kinds = []
    for kind, recorded in sorted(run.shard_hashes.items()):
        entries = index.entries(kind)
        mine = [e for e in entries if e.config_hash == recorded]
        others = sorted({e.config_hash for e in entries} - {recorded})
        kinds.append({"kind": kind, "config_hash": recorded, "files": len(mine),
                      "rows": sum(e.rows for e in mine), "other_configs": others})
    attrs = run.data.shards[0].attrs if run.data and run.data.shards else {}
    graphs = index.files("graphs")
    parser = shards.table_metadata(graphs[0]).get("config", {}) if graphs else {}
    return {"root": str(run.root), "dataset": run.config.dataset, "kinds": kinds,
            "weights": str(attrs.get("weights", "not recorded (features imported or written by a test)")),
            "weights_sha256": str(attrs.get("weights_sha256", "")),
            "random_weights": str(attrs.get("weights", "")).startswith("RANDOM"),
            "extractor": attrs.get("extractor") or {}, "parser": parser,
            "vocab_words": len(run.vocab), "vocab_fingerprint": run.vocab.fingerprint,
            "software": attrs.get("software") or {}}


@dataclass
class RunReport:
    """Everything the HTML shows of one run."""

    dir: Path
    name: str
    config: dict
    checkpoint: dict        # epoch (from 1, as metrics.csv counts), step, best_rsum of the weights scored
    checkpoint_name: str    # best or last
    split: str
    n_images: int
    sims_source: str
    evaluation: dict
    eval_source: str
    provenance: dict
    curves: str | None      # data: URI of the PNG, None without metrics.csv
    epochs: int
    results: Results
    gallery: Gallery


def curves_png(run_dirs: list) -> str | None:
    try:
        fig = plot.draw([str(d) for d in run_dirs])
    except FileNotFoundError:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plot.plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def collect(run_dir, args) -> RunReport:
    run = load_run(run_dir, args.root, which=args.checkpoint, device=args.device, split=args.split)
    sims, sims_source = split_sims(run, args.split, args.batch_size, args.workers, args.device,
                                   progress=not getattr(args, "quiet", False))
    pairs = hard_negative_pairs(Layout(run.root, run.config.dataset))
    ev, ev_source = evaluation(run, args.split, sims, pairs)
    metrics = run.dir / "metrics.csv"
    epochs = len(plot.read_metrics(run.dir)["epoch"]) if metrics.exists() else 0
    return RunReport(
        run.dir, run.dir.name, dataclasses.asdict(run.config),
        {"epoch": run.scored["epoch"], "step": run.checkpoint.get("step"),
         "best_rsum": run.checkpoint.get("best_rsum")}, run.which,
        args.split, len(run.data.image_ids), sims_source, ev, ev_source, provenance(run),
        curves_png([run.dir]), epochs,
        results(sims, run.data.image_ids, pairs, queries=args.queries, k=args.top, failures=args.failures,
                n_pairs=args.pairs, seed=args.seed),
        Gallery.open(run, args.thumb, args.boxes))


# ---------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #444;margin-top:2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f0f0f0;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
table.prov td:first-child,table.recipe td:first-child{background:#f0f0f0;font-weight:bold;white-space:nowrap}
.chance{color:#888;font-size:.85em}.shout{background:#c00;color:#fff;font-weight:bold;padding:.6em 1em;
margin:1em 0;font-size:1.1em}.note{color:#555}figure{display:inline-block;margin:2px 4px;vertical-align:top;
width:min-content}figure img{border:3px solid transparent;display:block}figure.gt img{border-color:#1a9e3a}
figcaption{font-size:.8em;min-width:8em}.legend span{display:inline-block;width:.8em;height:.8em;
margin-right:3px;vertical-align:middle}.legend{white-space:nowrap}li.gt{color:#1a7e2a;font-weight:bold}
table.t2i td:first-child,table.t2i-fail td:first-child{width:16em}table.i2t td:first-child,
table.i2t-fail td:first-child{width:12em}.ok{color:#1a7e2a;font-weight:bold}.bad{color:#c00;font-weight:bold}
code{font-size:.9em}.file{font-size:.85em;color:#555;word-break:break-all}
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def table(headers: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """``rows`` hold ready HTML cells (escape text with ``esc``); no header row when ``headers``
    is None (a table of name / value rows)."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join(f"<tr class=\"{cls}\">" + "".join(rows_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table class=\"{cls}\">{head}{body}</table>"


def rows_cell(c: str) -> str:
    return c if c.startswith("<td") else f"<td>{c}</td>"


def num(x, fmt: str = "{:.1f}", chance=None) -> str:
    text = fmt.format(x) if isinstance(x, (int, float)) else esc(x)
    extra = f" {grey(chance, fmt)}" if chance is not None else ""
    return f"<td class=\"num\">{text}{extra}</td>"


def grey(chance: float, fmt: str = "{:.1f}") -> str:
    return f"<span class=\"chance\">({fmt.format(chance)})</span>"


def figure(g: Gallery, i: int, label: str, gt: bool = False) -> str:
    uri, legend = g.labelled(i)
    items = "<br>".join(f"<span style=\"background:{c}\"></span>{esc(n)} {s:.2f}" for c, n, s in legend)
    image_id, name = int(g.image_ids[i]), g.file_name(i)
    title = f"{name} (image {image_id})" if name else f"image {image_id}"
    return (f"<figure class=\"{'gt' if gt else ''}\"><img src=\"{uri}\" alt=\"{esc(title)}\" "
            f"title=\"{esc(title)}\"><figcaption>{label}<div class=\"file\">{esc(name or title)}</div>"
            f"<div class=\"legend\">{items}</div></figcaption></figure>")


def recall_table(ev: dict) -> str:
    cols = [(d, k) for d in ("i2t", "t2i") for k in (1, 5, 10)]
    rows, other = [], []
    for protocol, e in ev.items():
        if all(f"{d}_r{k}" in e for d, k in cols) and "rsum" in e:
            ch = chance_metrics(chance_size(e)) if "images" in e else {}
            rows.append([esc(protocol), num(e.get("images", ""), "{:.0f}")]
                        + [num(e[f"{d}_r{k}"], chance=ch.get(f"{d}_r{k}")) for d, k in cols]
                        + [num(e["rsum"], chance=e.get("chance_rsum"))])
        elif protocol != "hard_negatives":   # eccv, cxc: their metrics, with chance where recorded
            chance = e.get("chance", {})
            other.append(f"<p><b>{esc(protocol)}</b>: " + ", ".join(
                f"{esc(k)} {v:.1f}" + (f" {grey(chance[k])}" if k in chance else "")
                for k, v in e.items() if isinstance(v, float)) + "</p>")
    out = table(["protocol", "images"] + [f"{d} R@{k}" for d, k in cols] + ["rSum"], rows, "recall")
    out += "<p class=\"note\">In grey: what random scores get on as many images (chance).</p>"
    out += "".join(other)
    hn = {k: v for k, v in ev.get("hard_negatives", {}).items() if isinstance(v, dict) and "i2t_acc" in v}
    if hn:
        out += "<h4>Hard negatives</h4>" + table(
            ["kind", "pairs", "image→text accuracy", "text→image accuracy"],
            [[esc(k), num(v["pairs"], "{:.0f}"), num(v["i2t_acc"], chance=50.0),
              num(v["t2i_acc"], chance=50.0)] for k, v in hn.items()], "hardneg")
    return out


def provenance_html(p: dict) -> str:
    out = ""
    if p["random_weights"]:
        out += (f"<div class=\"shout\">RANDOM EXTRACTOR WEIGHTS: {esc(p['weights'])}. The region features "
                "and their object/attribute labels come from an untrained detector: the labels name "
                "nothing in the images.</div>")
    ex = p["extractor"]
    settings = ", ".join(f"{k} {esc(ex[k])}" for k in ("boxes", "min_boxes", "max_boxes", "conf_thresh",
                                                         "min_size", "max_size") if k in ex)
    parser = ", ".join(f"{esc(k)} {esc(v)}" for k, v in p["parser"].items())
    out += table(None, [
        ["data root", f"<code>{esc(p['root'])}</code>"], ["dataset", esc(p["dataset"])],
        ["extractor weights", f"{esc(p['weights'])} <code>{esc(p['weights_sha256'])}</code>"],
        ["extractor settings", settings or "not recorded"],
        ["parser", parser or "not recorded"],
        ["vocabulary", f"{p['vocab_words']} words, fingerprint <code>{esc(p['vocab_fingerprint'])}</code>"],
        ["software", esc(", ".join(f"{k} {v}" for k, v in p["software"].items())) or "not recorded"]], "prov")
    out += table(["shards", "config hash (run)", "files", "rows", "shards.json now"], [
        [esc(k["kind"]), f"<code>{esc(k['config_hash'])}</code>", num(k["files"], "{:.0f}"),
         num(k["rows"], "{:,}"), "the same" if not k["other_configs"] else
         "<span class=\"bad\">also " + esc(", ".join(k["other_configs"])) + "</span>"]
        for k in p["kinds"]], "shards")
    return out


def recipe_html(r: RunReport) -> str:
    c = r.config
    cfg = ", ".join(f"{esc(k)} {esc(v)}" for k, v in c.get("model_config", {}).items())
    ck = r.checkpoint
    return table(None, [
        ["model", esc(c["model"])], ["model config", cfg],
        ["seed", esc(c.get("seed"))], ["splits", f"train {esc(c.get('train_split'))}, validation "
                                       f"{esc(c.get('val_split') or 'val')}"],
        ["epochs trained", esc(r.epochs)],
        ["weights scored", f"epoch {esc(ck.get('epoch'))} ({esc(r.checkpoint_name)}.pt), best validation "
                           f"rSum {num_text(ck.get('best_rsum'))}"]], "recipe")


def num_text(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else esc(x)


def text_rows(r: RunReport, items: list, cls: str) -> str:
    g, rows = r.gallery, []
    for q in items:
        gt_shown = any(i == q["gt"] for i, _ in q["hits"])
        figs = "".join(figure(g, i, f"{n + 1}. score {s:.3f}", gt=i == q["gt"])
                       for n, (i, s) in enumerate(q["hits"]))
        if not gt_shown:
            label = f"ground truth: rank {q['gt_rank']}, score {q['gt_score']:.3f}"
            figs += figure(g, q["gt"], label, gt=True)
        caption_id = int(g.caption_ids[q["caption"]])
        rows.append([f"{esc(g.text(q['caption']))}<br><span class=\"note\">caption {caption_id}, "
                     f"ground truth at rank {q['gt_rank']}</span>", figs])
    return table(["query", "top images (ground truth framed in green)"], rows, cls)


def image_rows(r: RunReport, items: list, cls: str) -> str:
    g, rows = r.gallery, []
    for q in items:
        lis = "".join(f"<li class=\"{'gt' if j // PER == q['image'] else ''}\">{esc(g.text(j))} "
                      f"<span class=\"note\">{s:.3f}</span></li>" for j, s in q["hits"])
        own = ""
        if all(j // PER != q["image"] for j, _ in q["hits"]):
            own = (f"<p class=\"note\">its own captions, best at rank {q['gt_rank']}: "
                   f"{esc(g.text(q['image'] * PER))}</p>")
        rows.append([figure(g, q["image"], ""),
                     f"<ol>{lis}</ol>{own}"])
    return table(["query", "top captions (its own in green)"], rows, cls)


def pair_rows(r: RunReport) -> str:
    g, rows = r.gallery, []
    for p in r.results.pairs:
        cells = []
        for j, sa, sb in p["scores"]:
            mine = "A" if j // PER == p["a"] else "B"
            own, other = (sa, sb) if mine == "A" else (sb, sa)
            mark = "<span class=\"ok\">right</span>" if own > other else "<span class=\"bad\">wrong</span>"
            cells.append(f"{mine}'s caption “{esc(g.text(j))}”: with A {sa:.3f}, with B {sb:.3f} {mark}")
        rows.append([esc(p["kind"]), figure(g, p["a"], "A"), figure(g, p["b"], "B"), "<br>".join(cells)])
    return table(["kind", "image A", "image B", "a caption of each, scored with both images"], rows, "pair")


def comparison_html(reports: list[RunReport]) -> str:
    protocols = list(dict.fromkeys(p for r in reports for p, e in r.evaluation.items() if "rsum" in e))
    kinds = list(dict.fromkeys(k for r in reports for k, v in r.evaluation.get("hard_negatives", {}).items()
                               if isinstance(v, dict) and "i2t_acc" in v))   # not its "checkpoint"
    rows = []
    for r in reports:
        cells = [f"<a href=\"#{esc(anchor(r))}\">{esc(r.name)}</a>", esc(r.config["model"]),
                 esc(f"{r.config['dataset']}/{r.split}"), num(r.epochs, "{:.0f}"),
                 num(r.checkpoint.get("best_rsum") or "")]
        for p in protocols:
            e = r.evaluation.get(p)
            cells += ([num(e["i2t_r1"]), num(e["t2i_r1"]), num(e["rsum"], chance=e.get("chance_rsum"))]
                      if e else ["", "", ""])
        hn = r.evaluation.get("hard_negatives", {})
        cells += [num(hn[k]["i2t_acc"]) if k in hn else "" for k in kinds]
        rows.append(cells)
    headers = (["run", "model", "data", "epochs", "best val rSum"]
               + [f"{p} {m}" for p in protocols for m in ("i2t R@1", "t2i R@1", "rSum")]
               + [f"hard neg. {k} i2t %" for k in kinds])
    return table(headers, rows, "compare")


def anchor(r: RunReport) -> str:
    return "run-" + "".join(c if c.isalnum() else "-" for c in str(r.dir))


def run_html(r: RunReport) -> str:
    res = r.results
    parts = [f"<section class=\"run\" id=\"{esc(anchor(r))}\"><h2>{esc(r.name)}: {esc(r.config['model'])} on "
             f"{esc(r.config['dataset'])}</h2><p class=\"note\"><code>{esc(r.dir)}</code></p>",
             "<h3>Data and shards</h3>", provenance_html(r.provenance),
             "<h3>Recipe</h3>", recipe_html(r),
             f"<h3>Recalls on {esc(r.split)} ({r.n_images} images)</h3>",
             f"<p class=\"note\">{esc(r.eval_source)}; similarities {esc(r.sims_source)}.</p>",
             recall_table(r.evaluation), "<h3>Training curves</h3>",
             f"<img class=\"curves\" src=\"{r.curves}\" alt=\"training curves\">" if r.curves
             else "<p>no metrics.csv</p>"]
    names = r.gallery.names
    if r.provenance["random_weights"]:
        parts.append("<p class=\"shout\">The box labels below come from RANDOM extractor weights: they name "
                     "nothing in the images.</p>")
    elif names.objects is None:
        parts.append("<p class=\"note\">The extractor's label set is not Visual Genome's: labels are shown "
                     "as numbers.</p>")
    parts += [f"<h3>Text → image: {len(res.text_queries)} captions of the split (seeded)</h3>",
              text_rows(r, res.text_queries, "t2i"),
              f"<h3>Image → text: {len(res.image_queries)} images of the split (seeded)</h3>",
              image_rows(r, res.image_queries, "i2t"),
              "<h3>Worst failures: ground truth ranked lowest</h3>",
              f"<h4>Text → image: the {len(res.t2i_failures)} captions whose image ranks lowest</h4>",
              text_rows(r, res.t2i_failures, "t2i-fail"),
              f"<h4>Image → text: the {len(res.i2t_failures)} images whose captions rank lowest</h4>",
              image_rows(r, res.i2t_failures, "i2t-fail")]
    if res.pairs:
        parts += [f"<h3>Hard-negative pairs ({len(res.pairs)})</h3>", pair_rows(r)]
    return "".join(parts) + "</section>"


def render(reports: list[RunReport], command: str, curves: str | None = None) -> str:
    """The whole page. ``curves``: the PNG of all runs' curves for the comparison (several runs)."""
    head = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>itmkit report: "
            f"{esc(', '.join(r.name for r in reports))}</title><style>{CSS}</style></head><body>"
            f"<h1>itmkit report</h1><p class=\"note\">{esc(time.strftime('%Y-%m-%d %H:%M'))} · "
            f"<code>{esc(command)}</code></p>")
    body = ""
    if len(reports) > 1:
        body += "<h2>Comparison</h2>" + comparison_html(reports)
        if curves:
            body += f"<img class=\"curves\" src=\"{curves}\" alt=\"training curves of all runs\">"
    body += "".join(run_html(r) for r in reports)
    return head + body + "</body></html>\n"


def write_report(args, command: str) -> str:
    """Write the report of ``args.runs`` to ``args.out``; the summary line."""
    started = time.perf_counter()
    reports = [collect(run, args) for run in args.runs]
    out = Path(args.out or Path(args.runs[0]) / "report.html")
    page = render(reports, command, curves_png([r.dir for r in reports]) if len(reports) > 1 else None)
    with shards.atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    res = reports[0].results
    return (f"report: {len(reports)} run(s), {args.split} split ({reports[0].n_images} images): "
            f"{len(res.text_queries)} text and {len(res.image_queries)} image queries, "
            f"{len(res.t2i_failures)}+{len(res.i2t_failures)} failures, {len(res.pairs)} hard-negative "
            f"pairs per run; {len(page.encode()) / 1e6:.1f} MB in {time.perf_counter() - started:.1f} s "
            f"-> {out}")


ERRORS = (ShardError, CheckpointError, ValueError, OSError)   # one line, exit 1


def main(argv=None) -> int:
    """``itmkit report`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    print(write_report(args, f"itmkit report {' '.join(args.runs)} --split {args.split}"))
    return 0


if __name__ == "__main__":   # python training/report.py ...: the same as itmkit report ...
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"report: error: {e}")
