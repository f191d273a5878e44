"""``itmkit extract``: images.parquet -> region and/or grid shards, chunk by chunk.

Chunk k of a split holds that split's images k*shard_size ... in images.parquet order. A chunk
whose shard is registered in shards.json with the same config hash and inputs is skipped, so a
rerun after a kill redoes only the unfinished chunk, and a second run does nothing."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from features.config import REGION_INPUTS, ExtractorConfig
from features.devices import held_gpu, visible_gpus
from features.profile import Stages, no_stages
from features.rcnn import BottomUpRCNN
from features.runner import Chunk, ChunkRunner, Report, RunOptions
from features.weights import RANDOM, WeightsError, load_weights, weights_info
from pipeline import precomp, shards
from pipeline.config import (UsageError, add_dataset_argument, add_quiet_argument, add_root_argument,
                             add_set_argument, add_threads_arguments, positive_int, resolve_root,
                             typed_settings)

KIND_CHOICES = {"regions": ("regions",), "grid": ("grid",), "both": ("regions", "grid")}


# ---------------------------------------------------------------------------------------------
# what to do

def plan_chunks(images, shard_size: int, given: dict | None, split=None, chunk=None) -> list[Chunk]:
    splits = np.asarray(images["split"].to_pylist(), dtype=object)
    ids, paths = images["image_id"].to_numpy(), images["path"].to_pylist()
    names = [split] if split else list(dict.fromkeys(splits.tolist()))
    if split and split not in set(splits.tolist()):
        raise UsageError(f"--split {split}: no images of that split in images.parquet")
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
        raise UsageError(f"--chunk {chunk}: no such chunk at --shard-size {shard_size}")
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
# the run

def extract(layout: shards.Layout, cfg: ExtractorConfig, kinds, weights: str = RANDOM, seed: int = 0,
            shard_size: int = 1000, split: str | None = None, chunk: int | None = None,
            options: RunOptions | None = None, progress: bool = True) -> Report:
    """Write the shards of ``kinds`` that are not current. Another process may run on the same
    dataset at the same time: each shard is written under its claim, a shard another process is
    writing is done last (by then it is usually current, and reused), and what is registered is
    always what is on disk."""
    options = options or RunOptions()
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
        model.to(options.device)
        if options.channels_last:
            model.channels_last()
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
    report.stages = Stages(options.device) if options.profile else None
    run = ChunkRunner(layout, cfg, model, images, given, attrs, cfg_hash, report, options,
                      report.stages or no_stages)
    t0, cpu0, benchmark = time.perf_counter(), time.process_time(), torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = options.cudnn_benchmark
        with tqdm(total=sum(len(c.rows) for c in todo), unit="img", desc=f"extract {layout.name}",
                  disable=not progress, dynamic_ncols=True) as bar:
            busy = run(todo, bar, wait=False)
            if busy:  # another process is writing them: wait for it, then take what is left
                print(f"features extract: {len(busy)} chunk(s) are being written by another process; "
                      "waiting for them", file=sys.stderr)
                run(busy, bar, wait=True)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    report.loop_seconds, report.loop_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    if chunk is None:
        for kind in kinds:
            planned = [layout.shard(kind, c.split, c.index) for c in chunks]
            report.removed += index.prune(kind, planned, splits={c.split for c in chunks}).removed
    _write_bad_report(layout, kinds, report)
    return report


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
    d, r = ExtractorConfig(), RunOptions()
    add_dataset_argument(p)
    add_root_argument(p)
    p.add_argument("--kind", choices=list(KIND_CHOICES), default="both",
                   help="region features, grid features, or both from one backbone pass")
    p.add_argument("--weights", required=True,
                   help="detectron2 pickle or torch state dict of the bottom-up Faster R-CNN, or "
                        f"'{RANDOM}' for a seeded model whose features mean nothing (tests, the demo)")
    p.add_argument("--seed", type=int, default=0, help=f"seed of the random model (--weights {RANDOM})")
    p.add_argument("--boxes", type=parse_boxes, default="adaptive",
                   help="adaptive (score >= --conf-thresh, 10..100 boxes), fixed:K, or given (boxes.parquet)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--gpu-locks", default=None, metavar="DIR",
                   help="with --device cuda: take the first GPU whose lock in DIR no other process holds and "
                        "keep it while running, so jobs started at once use different GPUs (default: GPU 0)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    p.add_argument("--batch-size", type=positive_int, default=r.batch_size,
                   help="images per forward pass (only images of one resized size are stacked)")
    add_threads_arguments(p)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision (float16 on CUDA, bfloat16 on CPU); other numbers, so another config hash")
    p.add_argument("--channels-last", action="store_true",
                   help="NHWC convolutions, faster on tensor-core GPUs; the same numbers up to rounding")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its algorithms for each new input size (GPU)")
    p.add_argument("--profile", action="store_true",
                   help="print where the time went: decode wait, backbone, RPN, box head, box selection, "
                        "writing (synchronises CUDA at every stage)")
    p.add_argument("--split", default=None, help="only this split (default: all)")
    p.add_argument("--chunk", type=int, default=None, help="only this chunk of each split (for scattering jobs)")
    p.add_argument("--min-size", type=int, default=d.min_size, help="short side after resize")
    p.add_argument("--max-size", type=int, default=d.max_size, help="long side limit")
    p.add_argument("--proposals", type=int, default=d.rpn_post_nms_topk, help="RPN proposals per image")
    p.add_argument("--conf-thresh", type=float, default=d.conf_thresh,
                   help="adaptive boxes: keep detections scoring at least this")
    p.add_argument("--min-boxes", type=int, default=d.min_boxes, help="adaptive boxes: at least this many")
    p.add_argument("--max-boxes", type=int, default=d.max_boxes, help="adaptive boxes: at most this many")
    p.add_argument("--region-input", choices=REGION_INPUTS, default=d.region_input,
                   help="what a region's features see: image (the whole image through the backbone's receptive "
                        "field, as the published extractor) or box (every pixel outside the box set to the mean "
                        "pixel; one backbone pass per box)")
    p.add_argument("--grid", type=int, nargs=2, default=list(d.grid_size), metavar=("H", "W"),
                   help="grid features: H x W cells")
    add_set_argument(p, "any other extractor setting of features/config.py (e.g. --set pooler=roi_pool)")
    add_quiet_argument(p)


def run_options(args, device: str) -> RunOptions:
    return RunOptions(device=device, batch_size=args.batch_size, workers=args.workers,
                      channels_last=args.channels_last, cudnn_benchmark=args.cudnn_benchmark,
                      profile=args.profile)


def config_from_args(args) -> ExtractorConfig:
    values = dict(min_size=args.min_size, max_size=args.max_size, boxes=args.boxes,
                  rpn_post_nms_topk=args.proposals, conf_thresh=args.conf_thresh, min_boxes=args.min_boxes,
                  max_boxes=args.max_boxes, region_input=args.region_input, grid_size=tuple(args.grid),
                  amp=args.amp)
    values.update(typed_settings(args.set, ExtractorConfig, "the extractor (features/config.py)"))
    return ExtractorConfig.from_dict(values)


def command(args) -> int:
    layout = shards.Layout(resolve_root(args.root).resolve(), args.dataset)
    if not layout.images.exists():
        root = shlex.quote(str(layout.root))
        print(f"features extract: {layout.images} not found; run `itmkit ingest --manifest MANIFEST --root "
              f"{root}` (or `itmkit demo --root {root}`) first", file=sys.stderr)
        return 1
    if precomp.imported(layout):
        print(f"features extract: {layout.name} was imported from precomp features, which come without "
              "images: there is nothing to extract from (ingest the images with `itmkit ingest` to "
              "extract features of your own)", file=sys.stderr)
        return 1
    kinds = KIND_CHOICES[args.kind]
    t0 = time.time()   # torch's threads: pipeline.config.command_threads
    try:
        with _device(args) as device:
            r = extract(layout, config_from_args(args), kinds, args.weights, args.seed, args.shard_size,
                        args.split, args.chunk, run_options(args, device), progress=not args.quiet)
    except UsageError:
        raise   # exit 2 (itmkit.cli)
    except (shards.ShardError, WeightsError, ValueError, RuntimeError) as e:
        print(f"features extract: error: {e}", file=sys.stderr)
        return 1
    secs = time.time() - t0
    skipped = sum(1 for b in r.bad if b[3] == "skipped")
    converted = sum(1 for b in r.bad if b[3] == "converted")
    parts = [f"wrote {r.written['regions']} regions + {r.written['grid']} grid shard(s) for {r.images} image(s) "
             f"in {secs:.1f}s ({r.images / max(secs, 1e-9):.2f} img/s; model setup {r.setup_seconds:.1f}s, "
             f"images {r.loop_seconds:.1f}s, CPU {r.loop_cpu_seconds:.1f}s)",
             f"reused {r.reused} current shard(s)"]
    if skipped or converted:
        parts.append(f"{skipped} bad image(s) skipped, {converted} converted (see {r.bad_path})")
    if r.meanwhile:
        parts.append(f"{r.meanwhile} of them written meanwhile by another process")
    if r.removed:
        parts.append(f"removed {len(r.removed)} leftover shard(s) of an older plan")
    if r.stages is not None:
        print(f"features extract: where the time went ({device}):\n{r.stages.table(r.loop_seconds, r.images)}",
              file=sys.stderr)
    weights = "RANDOM weights" if args.weights == RANDOM else f"weights {Path(args.weights).name}"
    boxes = f"boxes {args.boxes}" + (", each seen alone" if args.region_input == "box" else "")
    folders = ", ".join(str(Path(layout.pattern(kind)).parent) for kind in kinds)
    print(f"features extract: {args.dataset} [{args.kind}, {boxes}, {weights}]: " + "; ".join(parts)
          + f" -> {folders}")
    return 0


@contextlib.contextmanager
def _device(args):
    """The device this run uses: ``--device``, or with ``--gpu-locks`` and ``--device cuda`` the
    first free GPU (held until the run ends)."""
    if not (args.gpu_locks and args.device == "cuda"):
        yield args.device
        return
    gpus = visible_gpus()
    with held_gpu(gpus, args.gpu_locks) as i:
        torch.cuda.set_device(i)
        print(f"features extract: on GPU {i} of {len(gpus)} ({gpus[i]}), lock in {args.gpu_locks}", file=sys.stderr)
        yield f"cuda:{i}"
