"""Every GPU figure itmkit promises, on one CUDA device, in one run of under 8 minutes.

    python benchmarks/gpu.py                          # on a machine with a CUDA device
    python benchmarks/gpu.py --device cpu --tiny      # every part at tiny sizes: checks the script

Parts, in order (each prints as it finishes, with its wall time):
  1. extraction images/s at 600x1000 (synthetic 640x480 JPEGs -> 600x800, adaptive boxes, 300
     proposals, random weights), `features extract` end to end (decoding workers, writer thread;
     model setup not counted): regions + grid in one pass, regions only, grid only; batch 1 and
     4; AMP off and on; then batch 4 with every lever (AMP, channels-last, cuDNN autotuning);
  2. AMP (float16 on CUDA) against float32: feature difference on the same boxes, label and box
     agreement (benchmarks/extract.py's comparison);
  3. training samples/s per model (training/models) at paper size: COCO defaults, batch 128
     pairs of 36 regions (7x7 grid where the model reads it), one optimiser step per batch
     with AMP as training/train.py does on CUDA; synthetic batches (training/synthetic.py);
  4. 1K x 5K scoring time per model: encode 1,000 images and 5,000 captions and score every
     pair as evaluation does (benchmarks/retrieval_speed.py's measurement); a cross-attention
     model past --score-budget-s is timed on part of the image batches and extrapolated;
  5. CIMN against the fastest cross-attention model, from 4.
Without a CUDA device (and without --device cpu) it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling benchmark scripts
import retrieval_speed  # noqa: E402
from extract import amp_difference, decoded, make_jpegs, print_amp  # noqa: E402

from features.config import ExtractorConfig  # noqa: E402
from features.extract import extract  # noqa: E402
from features.runner import RunOptions  # noqa: E402
from training import models  # noqa: E402
from training.config import parse_shared_overrides  # noqa: E402
from training.data import Batch  # noqa: E402
from training.synthetic import random_caption_batches, random_image_batches, random_vocab  # noqa: E402

# --tiny: every part at sizes a CPU runs in seconds (what the script's test runs)
TINY_EXTRACT = dict(min_size=64, max_size=96, rpn_post_nms_topk=8, depth=50, num_classes=20,
                    bbox_reg_classes=20, num_attributes=10, res5_dilation=1)
TINY_MODEL = ["embed_dim=32", "word_dim=16"]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def section(title: str):
    print(f"\n## {title}", flush=True)
    return time.perf_counter()


# ---------------------------------------------------------------------------------------------
# 1. extraction

EXTRACT_RUNS = [  # (kinds, batch size, amp, channels-last + cuDNN autotuning)
    (kinds, batch, amp, False) for amp in (False, True) for batch in (1, 4)
    for kinds in (("regions", "grid"), ("regions",), ("grid",))] + [(("regions", "grid"), 4, True, True)]


def extraction(args, cfg: ExtractorConfig, root: Path) -> None:
    layout = make_jpegs(root, args.extract_images)
    print(f"{args.extract_images} images 640x480 -> {cfg.min_size}/{cfg.max_size}, {cfg.boxes} boxes, "
          f"{cfg.rpn_post_nms_topk} proposals, {args.workers} decoding workers; images/s of the loop "
          "(decode, model, writing), model setup not counted")
    print(f"{'kinds':<14} {'batch':>5} {'amp':>4} {'levers':>6} {'img/s':>8}")
    runs = EXTRACT_RUNS if not args.tiny else [r for r in EXTRACT_RUNS if (r[1], r[2]) == (1, False) or r[3]]
    warm = torch.device(args.device).type == "cuda"   # CUDA context, cuDNN handles, first allocations
    runs = runs[:1] * warm + runs
    for i, (kinds, batch, amp, levers) in enumerate(runs):
        for kind in ("regions", "grid"):   # a fresh run: nothing current to reuse
            layout.index.unregister(kind)
        options = RunOptions(device=args.device, batch_size=batch, workers=args.workers,
                             channels_last=levers, cudnn_benchmark=levers)
        with contextlib.redirect_stderr(io.StringIO()):   # "weights RANDOM ..." once per run
            r = extract(layout, dataclasses.replace(cfg, amp=amp), kinds, shard_size=10 ** 9, options=options,
                        progress=False)
        if warm and i == 0:
            continue
        label = "+".join(kinds) if len(kinds) == 1 else "both, 1 pass"
        print(f"{label:<14} {batch:>5} {'on' if amp else 'off':>4} {'all' if levers else '-':>6} "
              f"{r.images / r.loop_seconds:8.2f}", flush=True)


# ---------------------------------------------------------------------------------------------
# 3. training

def pair_batch(name: str, cfg, vocab, batch: int, boxes: int):
    cls = models.get(name)
    image = random_image_batches(batch, boxes, getattr(cfg, "feature_dim", 2048), batch,
                                 (7, 7) if cls.needs_grid else None)[0]
    text = random_caption_batches(batch, vocab, batch)[0]
    text = dataclasses.replace(text, image_ids=image.image_ids.clone())   # caption i describes image i
    return Batch(image, text)


def training(args) -> None:
    use_amp = torch.device(args.device).type == "cuda"   # as training/train.py
    print(f"samples/s of one optimiser step per batch (COCO defaults{', tiny: ' + ' '.join(args.set) if args.set else ''}); "
          f"{args.boxes} regions per image; AMP {'on' if use_amp else 'off'}")
    vocab = random_vocab()
    for name in models.names():
        cls = models.get(name)
        cfg = models.default_config(name, "coco", **parse_shared_overrides(args.set, cls.config_class))
        batch_size = args.train_batch or cfg.batch_size
        steps, secs = train_steps(name, cfg, vocab, batch_size, args, use_amp)
        print(f"  {name:<6} ({'two-tower' if cls.two_tower else 'cross-attention'}) batch {batch_size}: "
              f"{steps * batch_size / secs:10.1f} samples/s ({steps} steps in {secs:.2f}s)", flush=True)


def train_steps(name: str, cfg, vocab, batch_size: int, args, use_amp: bool) -> tuple[int, float]:
    """Timed optimiser steps of one model on one synthetic batch: (steps, seconds)."""
    device = torch.device(args.device)
    model = models.build(name, cfg, vocab).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    batch = pair_batch(name, cfg, vocab, batch_size, args.boxes).to(device)

    def step():
        with torch.autocast(device.type, enabled=use_amp):
            out = model(batch, epoch=cfg.warmup_epochs)
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(args.warmup_steps):
        step()
    sync(device)
    t, steps = time.perf_counter(), 0
    while steps < args.train_steps and (steps == 0 or time.perf_counter() - t < args.train_budget_s):
        step()
        steps += 1
        sync(device)
    return steps, time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# 4, 5. scoring 1K x 5K

def scoring(args) -> None:
    results = {}
    for name in models.names():
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ns = argparse.Namespace(device=args.device, threads=torch.get_num_threads(), only=name, probe=0,
                                set=args.set, images=args.score_images, boxes=args.boxes,
                                batch_size=args.score_batch, budget_s=args.score_budget_s)
        results[name] = r = retrieval_speed.measure(ns)
        retrieval_speed.report(r)
    two = [n for n in results if results[n]["two_tower"]]
    cross = [n for n in results if not results[n]["two_tower"]]
    if "cimn" in results and cross:
        fastest = min(cross, key=lambda n: results[n]["total_s"])
        c, f = results["cimn"], results[fastest]
        print(f"\n## CIMN against the fastest cross-attention model\n  cimn {c['total_s']:.2f} s vs {fastest} "
              f"{f['total_s']:.2f} s{' (extrapolated)' if f['extrapolated'] else ''} on {c['images']} x "
              f"{c['captions']}: cimn {f['total_s'] / c['total_s']:.1f}x faster "
              f"(two-tower: {', '.join(two)}; cross-attention: {', '.join(cross)})")


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu (with --tiny: a check)")
    p.add_argument("--tiny", action="store_true", help="every part at tiny sizes (default off)")
    p.add_argument("--extract-images", type=int, default=32, help="images per extraction run (default 32)")
    p.add_argument("--workers", type=int, default=4, help="decoding workers of the extraction runs (default 4)")
    p.add_argument("--amp-images", type=int, default=4, help="images of the AMP comparison (default 4)")
    p.add_argument("--boxes", type=int, default=36, help="regions per image for training and scoring (default 36)")
    p.add_argument("--train-batch", type=int, default=0, help="pairs per step (default 0: the model's, 128)")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps per model (default 3)")
    p.add_argument("--train-steps", type=int, default=20, help="timed training steps per model, at most (default 20)")
    p.add_argument("--train-budget-s", type=float, default=20.0, help="time per model's timed steps (default 20)")
    p.add_argument("--score-images", type=int, default=1000, help="images scored, captions 5x (default 1000)")
    p.add_argument("--score-batch", type=int, default=128, help="images per scoring block (default 128)")
    p.add_argument("--score-budget-s", type=float, default=30.0,
                   help="time per cross-attention model before extrapolating (default 30)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override where the model has the field (default: none; --tiny adds "
                        f"{' '.join(TINY_MODEL)})")
    args = p.parse_args(argv)
    if args.device is None:
        if not torch.cuda.is_available():
            print("gpu benchmark: no CUDA device on this machine, nothing measured; run it where there is one "
                  "(`python benchmarks/gpu.py --device cpu --tiny` checks the script on a CPU)")
            return 0
        args.device = "cuda"
    cfg = ExtractorConfig()
    if args.tiny:
        cfg = dataclasses.replace(cfg, **TINY_EXTRACT)
        args.set = TINY_MODEL + args.set
        args.extract_images, args.amp_images, args.workers = 2, 1, min(args.workers, 1)
        args.score_images, args.score_batch, args.boxes = 8, 4, 4
        args.train_batch, args.warmup_steps, args.train_steps, args.score_budget_s = 4, 1, 2, 5.0
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"# gpu benchmark: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}{', TINY sizes (a check, not figures)' if args.tiny else ''}",
          flush=True)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        t = section("1. extraction images/s")
        extraction(args, cfg, Path(tmp) / "extract")
        print(f"({time.perf_counter() - t:.0f} s)")
        t = section("2. AMP against float32")
        tensors, sizes, _ = decoded(make_jpegs(Path(tmp) / "amp", args.amp_images, seed=1), cfg)
        print_amp(amp_difference(cfg, tensors, sizes, args.device), f"{cfg.min_size}/{cfg.max_size}, adaptive boxes")
        print(f"({time.perf_counter() - t:.0f} s)")
    t = section("3. training samples/s")
    training(args)
    print(f"({time.perf_counter() - t:.0f} s)")
    t = section(f"4. scoring {args.score_images} x {5 * args.score_images}")
    scoring(args)
    print(f"({time.perf_counter() - t:.0f} s)")
    print(f"\n# done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
