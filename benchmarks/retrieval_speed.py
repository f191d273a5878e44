"""Inference time of retrieval: CIMN (two-tower) against the fastest cross-attention model.

    python benchmarks/retrieval_speed.py [--images 1000] [--boxes 36] [--budget-s 120]
           [--cross MODEL ...] [--set KEY=VALUE ...] [--device cpu] [--threads 2]

Scores N images x 5N captions of synthetic inputs (random region features and boxes, random
captions of 8-16 words with a small scene graph) the way evaluation does: encode every image
and caption in batches, then ``similarity`` (one matrix product for a two-tower model, every
(image batch, caption batch) block for a cross-attention one). Each model runs in its own
process so that its peak memory (max RSS, or peak CUDA memory) is its own. Models use their
default (paper-size) configs unless changed with --set (applied where the field exists).

Which cross-attention model is the fastest is measured, not assumed: each registered one scores
one block first, its full-task time is predicted from that probe (caption encoding scaled by the
number of captions, scoring by the number of blocks), and the fastest is timed on the full task.
A cross-attention model that would exceed --budget-s is timed on as many image batches as fit
in the budget and extrapolated linearly in the number of image batches (the caption encoding is
measured in full); the output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from training import models
from training.config import parse_shared_overrides
from training.synthetic import random_caption_batches, random_image_batches, random_vocab

def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(args) -> dict:
    """Time one model on the task (this process only)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    voc = random_vocab()
    cls = models.get(args.only)
    overrides = parse_shared_overrides(args.set, cls.config_class)
    model = models.build(args.only, overrides, voc).to(device).eval()
    feature_dim = getattr(model.cfg, "feature_dim", 2048)
    n_img = args.images if args.probe == 0 else min(args.images, args.batch_size)
    n_txt = 5 * args.images if args.probe == 0 else 5 * args.batch_size
    imgs = random_image_batches(n_img, args.boxes, feature_dim, args.batch_size,
                         (7, 7) if cls.needs_grid else None)
    txts = random_caption_batches(n_txt, voc, args.batch_size * 5)

    sync(device)
    t0 = time.perf_counter()
    txt_enc = [model.encode_text(b.to(device)) for b in txts]
    if cls.two_tower:
        txt_enc = [torch.cat(txt_enc)]
    sync(device)
    t_text = time.perf_counter() - t0
    t_img_blocks, done = [], 0
    for b in imgs:
        sync(device)
        t1 = time.perf_counter()
        enc = model.encode_image(b.to(device))
        scores = torch.cat([model.similarity(enc, te).float() for te in txt_enc], 1)
        sync(device)
        t_img_blocks.append(time.perf_counter() - t1)
        done += len(b)
        assert scores.shape == (len(b), n_txt)
        if not cls.two_tower and args.probe == 0 and time.perf_counter() - t0 > args.budget_s \
                and done < n_img:
            break
    measured = t_text + sum(t_img_blocks)
    blocks = math.ceil(n_img / args.batch_size)
    total = t_text + sum(t_img_blocks) / len(t_img_blocks) * blocks
    return {"model": args.only, "two_tower": cls.two_tower, "images": n_img, "captions": n_txt,
            "image_batches_timed": len(t_img_blocks), "image_batches": blocks,
            "text_s": t_text, "measured_s": measured, "total_s": total,
            "extrapolated": len(t_img_blocks) < blocks, "peak_mb": peak_memory_mb(device),
            "params": sum(p.numel() for p in model.parameters())}


def run_child(args, name: str, probe: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", name, "--probe", str(probe),
           "--images", str(args.images), "--boxes", str(args.boxes), "--batch-size", str(args.batch_size),
           "--budget-s", str(args.budget_s), "--device", args.device, "--threads", str(args.threads)]
    for s in args.set:
        cmd += ["--set", s]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: benchmark failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cimn", help="the two-tower model (default cimn)")
    p.add_argument("--cross", nargs="*", help="cross-attention models to consider (default: all registered)")
    p.add_argument("--images", type=int, default=1000, help="images; captions are 5x (default 1000)")
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--batch-size", type=int, default=128, help="images per block (captions: 5x)")
    p.add_argument("--budget-s", type=float, default=120.0,
                   help="time budget per cross-attention model before extrapolating (default 120)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every model that has the field (e.g. embed_dim=256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args)))
        return 0

    if not models.get(args.model).two_tower:
        raise SystemExit(f"retrieval_speed: --model {args.model} is not a two-tower model")
    cross = args.cross if args.cross is not None else [n for n in models.names() if not models.get(n).two_tower]
    print(f"retrieval_speed: {args.images} images x {5 * args.images} captions, {args.boxes} boxes, "
          f"device {args.device}, {args.threads} thread(s)", flush=True)
    main_result = run_child(args, args.model)
    report(main_result)
    if not cross:
        print(f"retrieval_speed: {args.model} {main_result['total_s']:.2f} s; no cross-attention model "
              "is registered, so the comparison is still to do")
        return 0
    probes = {}
    for name in cross:
        try:
            probes[name] = r = run_child(args, name, probe=1)
            print(f"  probe {name}: one block of {r['images']} x {r['captions']} in {r['measured_s']:.2f} s "
                  f"(caption encoding {r['text_s']:.2f} s): full task predicted "
                  f"{probe_estimate(r, args.images, args.batch_size):.0f} s")
        except RuntimeError as e:
            print(f"  probe {name}: skipped, it failed: {str(e).strip().splitlines()[-1]}")
    if not probes:
        print("retrieval_speed: every cross-attention model failed; no comparison")
        return 1
    fastest = min(probes, key=lambda n: probe_estimate(probes[n], args.images, args.batch_size))
    result = run_child(args, fastest)
    report(result)
    ratio = result["total_s"] / main_result["total_s"]
    print(f"retrieval_speed: {args.model} {main_result['total_s']:.2f} s vs {fastest} (fastest "
          f"cross-attention of {', '.join(cross)}) {result['total_s']:.2f} s"
          f"{' (extrapolated)' if result['extrapolated'] else ''}: {ratio:.1f}x faster")
    return 0


def probe_estimate(r: dict, images: int, batch: int) -> float:
    """Full-task time predicted from a probe (captions of one block, one image block against
    them): caption encoding scales with the number of captions, scoring with images x captions."""
    scale = 5 * images / r["captions"]
    return r["text_s"] * scale + (r["measured_s"] - r["text_s"]) * scale * math.ceil(images / batch)


def report(r: dict) -> None:
    how = (f"extrapolated from {r['image_batches_timed']} of {r['image_batches']} image batches"
           if r["extrapolated"] else "measured in full")
    print(f"  {r['model']:8s} ({'two-tower' if r['two_tower'] else 'cross-attention'}, "
          f"{r['params'] / 1e6:.1f}M params): {r['images']} x {r['captions']} in {r['total_s']:.2f} s "
          f"({how}; caption encoding {r['text_s']:.2f} s), peak memory {r['peak_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
