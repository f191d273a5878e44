"""``python -m features extract``: images.parquet -> region and/or grid shards, chunk by chunk.

Chunk k of a split holds that split's images k*shard_size ... in images.parquet order. A chunk
whose shard is registered in shards.json with the same config hash and inputs is skipped, so a
rerun after a kill redoes only the unfinished chunk, and a second run does nothing."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from features.config import ExtractorConfig
from features.rcnn import BottomUpRCNN
from features.single import result_regions
from features.transforms import BadImage, load_image, to_network_input
from features.weights import RANDOM, WeightsError, load_weights, weights_info
from pipeline import shards
from pipeline.config import add_root_argument, resolve_root

KIND_CHOICES = {"regions": ("regions",), "grid": ("grid",), "both": ("regions", "grid")}


# ---------------------------------------------------------------------------------------------
# what to do

@dataclass
class Chunk:
    split: str
    index: int
    rows: np.ndarray                 # positions in images.parquet
    ids: list                        # their image ids
    inputs_hash: dict                # kind -> hash of what the chunk's shard is made from
    kinds: list = field(default_factory=list)   # kinds whose shard must be (re)written


def plan_chunks(images, shard_size: int, given: dict | None, split=None, chunk=None) -> list[Chunk]:
    splits = np.asarray(images["split"].to_pylist(), dtype=object)
    ids, paths = images["image_id"].to_numpy(), images["path"].to_pylist()
    names = [split] if split else list(dict.fromkeys(splits.tolist()))
    if split and split not in set(splits.tolist()):
        raise SystemExit(f"features extract: no images of split {split!r} in images.parquet")
    chunks = []
    for name in names:
        rows = np.flatnonzero(splits == name)
        for k in range(-(-len(rows) // shard_size)):
            if chunk is not None and k != chunk:
                continue
            part = rows[k * shard_size:(k + 1) * shard_size]
            inputs = {"ids": ids[part].tolist(), "paths": [paths[i] for i in part]}
            hashes = {"grid": shards.config_hash(inputs), "regions": shards.config_hash(inputs)}
            if given is not None:  # given boxes are an input of the region shards only
                boxes = [given.get(int(ids[i]), np.zeros((0, 4))).tolist() for i in part]
                hashes["regions"] = shards.config_hash(dict(inputs, boxes=boxes))
            chunks.append(Chunk(name, k, part, inputs["ids"], hashes))
    if chunk is not None and not chunks:
        raise SystemExit(f"features extract: chunk {chunk} does not exist at --shard-size {shard_size}")
    return chunks


def read_given_boxes(layout: shards.Layout, images) -> dict[int, np.ndarray]:
    table = shards.read_table(layout.boxes, "boxes")
    sizes = dict(zip(images["image_id"].to_pylist(), zip(images["width"].to_pylist(), images["height"].to_pylist())))
    out = {}
    for row, (image_id, flat) in enumerate(zip(table["image_id"].to_pylist(), table["boxes"].to_pylist())):
        flat = np.asarray(flat or [], dtype=np.float32)
        where = f"{layout.boxes}: row {row} (image {image_id})"
        if len(flat) % 4:
            raise ValueError(f"{where}: {len(flat)} box numbers, not a multiple of 4")
        b = flat.reshape(-1, 4)
        if not np.isfinite(b).all() or np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
            raise ValueError(f"{where}: boxes must be finite x1,y1,x2,y2 with x2 > x1 and y2 > y1")
        w, h = sizes.get(image_id, (None, None))
        if w and (b.min(initial=0) < 0 or np.any(b[:, 2] > w) or np.any(b[:, 3] > h)):
            raise ValueError(f"{where}: boxes {b.tolist()} leave the {w}x{h} image")
        out[int(image_id)] = b
    return out


# ---------------------------------------------------------------------------------------------
# decoding in DataLoader workers

class ImageDataset(Dataset):
    def __init__(self, paths: list[str], cfg: ExtractorConfig):
        self.paths, self.cfg = paths, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        cfg = self.cfg
        try:
            im, note = load_image(self.paths[row], cfg.max_pixels, cfg.min_image_side)
        except BadImage as e:
            return {"row": row, "image": None, "error": str(e)}
        return {"row": row, "image": to_network_input(im, cfg.min_size, cfg.max_size),
                "orig_hw": (im.height, im.width), "note": note, "error": None}


# ---------------------------------------------------------------------------------------------
# one output file per kind and chunk

class RegionsOutput:
    def __init__(self, path, attrs, boxes_per_chunk):
        self.writer = shards.RegionShardWriter(path, boxes_per_chunk=boxes_per_chunk, attrs=attrs)
        self.rows = 0

    def add(self, image_id, hw, result):
        self.rows += 1
        self.writer.append(result_regions(image_id, hw, result))

    def close(self) -> int:
        self.writer.close()
        return self.rows

    def abort(self):
        self.writer.abort()


class GridOutput:
    def __init__(self, path, attrs, grid_size):
        self.path, self.attrs, self.grid_size = path, attrs, grid_size
        self.ids, self.features = [], []

    def add(self, image_id, hw, result):
        self.ids.append(image_id)
        self.features.append(result["grid"].cpu().numpy().astype(np.float16))

    def close(self) -> int:
        feats = (np.stack(self.features) if self.features else
                 np.zeros((0, self.grid_size[0] * self.grid_size[1], shards.FEATURE_DIM), np.float16))
        shards.write_grid(self.path, np.asarray(self.ids, np.int64), feats, self.grid_size, attrs=self.attrs)
        return len(self.ids)

    def abort(self):
        pass


# ---------------------------------------------------------------------------------------------
# the run

@dataclass
class Report:
    written: dict = field(default_factory=lambda: {"regions": 0, "grid": 0})
    reused: int = 0
    meanwhile: int = 0                               # of those, written by another process meanwhile
    images: int = 0
    bad: list = field(default_factory=list)          # (image_id, path, split, action, reason)
    removed: list = field(default_factory=list)
    bad_path: Path | None = None
    setup_seconds: float = 0.0                       # building the model and filling its weights
    loop_seconds: float = 0.0                        # decoding, forward passes and writing shards


def extract(layout: shards.Layout, cfg: ExtractorConfig, kinds, weights: str = RANDOM, seed: int = 0,
            device: str = "cpu", shard_size: int = 1000, batch_size: int = 2, workers: int = 2,
            split: str | None = None, chunk: int | None = None, progress: bool = True) -> Report:
    """Write the shards of ``kinds`` that are not current. Another process may run on the same
    dataset at the same time: each shard is written under its claim, a shard another process is
    writing is done last (by then it is usually current, and reused), and what is registered is
    always what is on disk."""
    index = layout.index
    images = shards.read_table(layout.images, "images")
    given = read_given_boxes(layout, images) if cfg.boxes == "given" else None
    info = weights_info(weights, seed)
    cfg_hash = {kind: cfg.shard_hash(kind, info.sha256) for kind in kinds}
    chunks = plan_chunks(images, shard_size, given, split, chunk)
    report = Report()
    altered = []
    for c in chunks:
        status = {k: index.status(k, layout.shard(k, c.split, c.index), cfg_hash[k], c.inputs_hash[k])
                  for k in kinds}
        c.kinds = [k for k in kinds if status[k] != "current"]
        altered += [layout.shard(k, c.split, c.index) for k in kinds if status[k] == "altered"]
        report.reused += len(kinds) - len(c.kinds)
    todo = [c for c in chunks if c.kinds]
    model, t0 = None, time.perf_counter()
    if todo:  # building and filling the model costs seconds: only when there is work
        model = BottomUpRCNN(cfg)
        load_weights(model, weights, seed)   # refused weights stop the run before anything is said
        model.to(device)
    report.setup_seconds = time.perf_counter() - t0
    if todo and info.is_random:
        print(f"features extract: weights {info.description}", file=sys.stderr)
    for kind in kinds:
        stale = index.stale(kind, cfg_hash[kind])
        if stale:
            print(f"features extract: {len(stale)} {kind} shard(s) were written with another config "
                  f"({sorted({e.config_hash for e in stale})}); those in this run are replaced", file=sys.stderr)
    if altered:
        print(f"features extract: {len(altered)} shard(s) differ from shards.json (altered), "
              f"rewriting them: {', '.join(p.name for p in altered[:5])}", file=sys.stderr)
    attrs = {"extractor": cfg.to_dict(), "config_hash": cfg_hash, "weights": info.description,
             "weights_sha256": info.sha256, "dataset": layout.name}
    run = ChunkRunner(layout, cfg, model, images, given, attrs, cfg_hash, report, batch_size, workers)
    t0 = time.perf_counter()
    with tqdm(total=sum(len(c.rows) for c in todo), unit="img", desc=f"extract {layout.name}",
              disable=not progress, dynamic_ncols=True) as bar:
        busy = run(todo, bar, wait=False)
        if busy:  # another process is writing them: wait for it, then take what is left
            print(f"features extract: {len(busy)} chunk(s) are being written by another process; "
                  "waiting for them", file=sys.stderr)
            run(busy, bar, wait=True)
    report.loop_seconds = time.perf_counter() - t0
    if chunk is None:
        for kind in kinds:
            planned = [layout.shard(kind, c.split, c.index) for c in chunks]
            report.removed += index.prune(kind, planned, splits={c.split for c in chunks}).removed
    _write_bad_report(layout, kinds, report)
    return report


class ChunkRunner:
    """Runs chunks through the model: claims each chunk's outputs before its images are decoded
    (in DataLoader workers), and writes and registers each output when its chunk ends. Batches
    never cross a chunk boundary, so a resumed chunk sees the same batches."""

    def __init__(self, layout, cfg, model, images, given, attrs, cfg_hash, report, batch_size, workers):
        self.layout, self.cfg, self.model, self.given = layout, cfg, model, given
        self.ids, self.paths = images["image_id"].to_numpy(), images["path"].to_pylist()
        self.attrs, self.cfg_hash, self.report = attrs, cfg_hash, report
        self.batch_size, self.workers = batch_size, workers

    def __call__(self, chunks: list[Chunk], bar, wait: bool) -> list[Chunk]:
        """Write ``chunks``; return those another process holds (only when ``wait`` is False)."""
        busy, claims = [], {}   # claims: id(chunk) -> the ExitStack that holds its outputs

        def batches():  # runs in this process, a few batches ahead of the model
            for c in chunks:
                stack = contextlib.ExitStack()
                state = self._claim(stack, c, wait)
                if state == "busy":
                    busy.append(c)
                if state != "write":
                    bar.update(len(c.rows))
                    continue
                claims[id(c)] = stack
                for i in range(0, len(c.rows), self.batch_size):
                    yield c.rows[i:i + self.batch_size].tolist()

        loader = DataLoader(ImageDataset(self.paths, self.cfg), batch_sampler=batches(),
                            num_workers=self.workers, collate_fn=list)
        owner = {int(r): c for c in chunks for r in c.rows}
        current, outputs = None, {}
        try:
            for batch in loader:
                c = owner[batch[0]["row"]]
                if c is not current:
                    current = c
                    outputs = _open_outputs(self.layout, c, self.attrs, self.cfg, self.given, self.ids)
                _run_batch(self.model, batch, c, outputs, self.given, self.ids, self.paths, self.report)
                self.report.images += len(batch)
                bar.update(len(batch))
                if batch[-1]["row"] == int(c.rows[-1]):
                    _finish(self.layout.index, self.layout, c, outputs, self.cfg_hash, self.report)
                    outputs = {}
                    claims.pop(id(c)).close()
        except BaseException:
            for out in outputs.values():
                out.abort()
            raise
        finally:
            for stack in claims.values():
                stack.close()
        return busy

    def _claim(self, claims: contextlib.ExitStack, c: Chunk, wait: bool) -> str:
        """'write' (``claims`` holds the chunk's outputs that are still to do), 'busy' (another
        process holds one) or 'done' (another process wrote them meanwhile)."""
        for kind in c.kinds:
            if not claims.enter_context(shards.claim(self.layout.shard(kind, c.split, c.index), wait=wait)):
                claims.close()
                return "busy"
        todo = [k for k in c.kinds if not self.layout.index.is_valid(
            k, self.layout.shard(k, c.split, c.index), self.cfg_hash[k], c.inputs_hash[k])]
        self.report.reused += len(c.kinds) - len(todo)
        self.report.meanwhile += len(c.kinds) - len(todo)
        c.kinds = todo
        if not todo:
            claims.close()
        return "write" if todo else "done"


def _open_outputs(layout, c: Chunk, attrs, cfg, given, ids) -> dict:
    outs = {}
    for kind in c.kinds:
        a = dict(attrs, split=c.split, chunk=c.index, kind=kind, config_hash=attrs["config_hash"][kind])
        path = layout.shard(kind, c.split, c.index)
        if kind == "regions":
            per = cfg.fixed_boxes or (max([len(given.get(int(ids[r]), ())) for r in c.rows], default=1)
                                      if given is not None else cfg.max_boxes)
            outs[kind] = RegionsOutput(path, a, max(1, per))
        else:
            outs[kind] = GridOutput(path, a, cfg.grid_size)
    return outs


def _run_batch(model, batch, c: Chunk, outputs, given, ids, paths, report):
    good = []
    for item in batch:
        image_id, path = int(ids[item["row"]]), paths[item["row"]]
        if item["error"] is None and given is not None and image_id not in given:
            item["error"] = "no boxes for this image in boxes.parquet"
        if item["error"] is not None:
            report.bad.append((image_id, path, c.split, "skipped", item["error"]))
            continue
        if item["note"]:
            report.bad.append((image_id, path, c.split, "converted", item["note"]))
        good.append(item)
    if not good:
        return
    boxes = None if given is None else [torch.from_numpy(given[int(ids[it["row"]])]) for it in good]
    results = model([it["image"] for it in good], [it["orig_hw"] for it in good], boxes,
                    regions="regions" in outputs, grid="grid" in outputs)
    for it, res in zip(good, results):
        for out in outputs.values():
            out.add(int(ids[it["row"]]), it["orig_hw"], res)


def _finish(index, layout, c: Chunk, outputs, cfg_hash, report):
    chunk_ids = set(c.ids)
    skipped = sorted({b[0] for b in report.bad if b[3] == "skipped" and b[0] in chunk_ids})
    for kind, out in outputs.items():
        rows = out.close()
        index.register(kind, layout.shard(kind, c.split, c.index), rows=rows, config_hash=cfg_hash[kind],
                       inputs_hash=c.inputs_hash[kind], extra={"skipped_images": skipped} if skipped else None)
        report.written[kind] += 1


def _write_bad_report(layout, kinds, report) -> Path | None:
    if not report.bad:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    path = layout.dir / kinds[0] / f"bad-images-{stamp}-{os.getpid()}.tsv"
    with shards.atomic_path(path) as tmp:
        lines = ["image_id\tpath\tsplit\taction\treason"]
        lines += ["\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in b) for b in report.bad]
        tmp.write_text("\n".join(lines) + "\n")
    report.bad_path = path
    return path


# ---------------------------------------------------------------------------------------------
# command line

def parse_boxes(value: str) -> str:
    ExtractorConfig(boxes=value)  # validates
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ExtractorConfig()
    p.add_argument("--dataset", required=True, help="dataset name (folder under the data root)")
    add_root_argument(p)
    p.add_argument("--kind", choices=list(KIND_CHOICES), default="both",
                   help="region features, grid features, or both from one backbone pass (default both)")
    p.add_argument("--weights", default=RANDOM,
                   help="detectron2 pickle or torch state dict, or 'random' (seeded; features not meaningful)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random model (--weights random)")
    p.add_argument("--boxes", type=parse_boxes, default="adaptive",
                   help="adaptive (score >= --conf-thresh, 10..100 boxes), fixed:K, or given (boxes.parquet)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding workers (0: in-process)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (default: torch's choice; 1 is fastest on a busy machine)")
    p.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--split", default=None, help="only this split")
    p.add_argument("--chunk", type=int, default=None, help="only this chunk of each split (for scattering jobs)")
    p.add_argument("--min-size", type=int, default=d.min_size, help="short side after resize (default 600)")
    p.add_argument("--max-size", type=int, default=d.max_size, help="long side limit (default 1000)")
    p.add_argument("--proposals", type=int, default=d.rpn_post_nms_topk, help="RPN proposals per image (default 300)")
    p.add_argument("--conf-thresh", type=float, default=d.conf_thresh)
    p.add_argument("--min-boxes", type=int, default=d.min_boxes)
    p.add_argument("--max-boxes", type=int, default=d.max_boxes)
    p.add_argument("--grid", type=int, nargs=2, default=list(d.grid_size), metavar=("H", "W"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other extractor setting (see features/config.py), e.g. --set pooler=roi_pool; "
                        "values are JSON (numbers, true/false, lists) or plain strings")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args) -> ExtractorConfig:
    values = dict(min_size=args.min_size, max_size=args.max_size, boxes=args.boxes,
                  rpn_post_nms_topk=args.proposals, conf_thresh=args.conf_thresh, min_boxes=args.min_boxes,
                  max_boxes=args.max_boxes, grid_size=tuple(args.grid), amp=args.amp)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return ExtractorConfig.from_dict(values)


def main(args) -> int:
    layout = shards.Layout(resolve_root(args.root).resolve(), args.dataset)
    if not layout.images.exists():
        print(f"features extract: {layout.images} not found; run `python -m pipeline ingest` "
              f"(or `demo`) first", file=sys.stderr)
        return 2
    if args.shard_size < 1 or args.batch_size < 1:
        print("features extract: --shard-size and --batch-size must be >= 1", file=sys.stderr)
        return 2
    kinds = KIND_CHOICES[args.kind]
    t0, threads = time.time(), torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        r = extract(layout, config_from_args(args), kinds, args.weights, args.seed, args.device,
                    args.shard_size, args.batch_size, args.workers, args.split, args.chunk,
                    progress=not args.no_progress)
    except (shards.ShardError, WeightsError, ValueError, RuntimeError) as e:
        print(f"features extract: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
    secs = time.time() - t0
    skipped = sum(1 for b in r.bad if b[3] == "skipped")
    converted = sum(1 for b in r.bad if b[3] == "converted")
    parts = [f"wrote {r.written['regions']} regions + {r.written['grid']} grid shard(s) for {r.images} image(s) "
             f"in {secs:.1f}s ({r.images / max(secs, 1e-9):.2f} img/s)",
             f"reused {r.reused} current shard(s)"]
    if skipped or converted:
        parts.append(f"{skipped} bad image(s) skipped, {converted} converted (see {r.bad_path})")
    if r.meanwhile:
        parts.append(f"{r.meanwhile} of them written meanwhile by another process")
    if r.removed:
        parts.append(f"removed {len(r.removed)} leftover shard(s) of an older plan")
    weights = "RANDOM weights" if args.weights == RANDOM else f"weights {Path(args.weights).name}"
    print(f"features extract: {args.dataset} [{args.kind}, boxes {args.boxes}, {weights}]: " + "; ".join(parts))
    return 0
