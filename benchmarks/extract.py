"""Feature extraction figures of this machine, in one run (each part can be run alone):

  way       the workflow's way against the old way on the same images: one job writing regions
            and grid from one backbone pass, against two jobs (regions, then grid), each a
            `itmkit extract` process as Snakemake starts it (process start, model
            setup and the images all counted):
              - given boxes at the demo size: one shard of the demo (its test split, 100 images
                at 160 px, the demo's settings from config/config.yaml);
              - adaptive boxes at 600x1000: synthetic 640x480 JPEGs (-> 600x800), 300 proposals;
  overhead  the runner's images against the bare model (regions + grid from pre-decoded tensors,
            nothing written), same images, batch size and threads: what decoding in workers and
            the writer thread cost the model;
  amp       half precision against float32 on the same images and weights (bfloat16 on CPU,
            float16 on CUDA): feature difference on the same boxes, object / attribute label
            agreement on them, and how many float32 boxes adaptive selection keeps under AMP;
  plan      `snakemake -n features_coco` on a fake ingest of COCO's size (123,287 images,
            616,435 captions): the DAG's job counts and the planning time.

    python benchmarks/extract.py [--parts way,overhead,amp,plan] [--threads 1] [--adaptive-images 3]

Random weights (speed does not depend on their values; for `amp` they make labels less peaked
than trained weights, so agreement is a lower bound). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from torchvision.ops import box_iou

from features.config import ExtractorConfig
from features.extract import read_given_boxes
from features.rcnn import BottomUpRCNN
from features.transforms import load_image, to_network_input
from features.weights import load_weights
from pipeline import shards
from pipeline.demo import DemoConfig, generate

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
PARTS = ("way", "overhead", "amp", "plan")
DEMO_CFG = ExtractorConfig(boxes=CONFIG["demo_boxes"], min_size=CONFIG["demo_min_size"], max_size=CONFIG["demo_max_size"])
BIG_CFG = ExtractorConfig()   # adaptive boxes, 600/1000, 300 proposals


# ---------------------------------------------------------------------------------------------
# the images

def make_jpegs(root: Path, n: int, seed: int = 0) -> shards.Layout:
    """``n`` 640x480 JPEGs of coloured shapes (COCO's most common size), split "train"."""
    layout = shards.Layout(root, "bench")
    (layout.dir / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        im = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = rng.integers(0, 560), rng.integers(0, 400)
            w, h = rng.integers(30, 200, 2)
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (d.rectangle if rng.random() < 0.5 else d.ellipse)([x, y, x + w, y + h], fill=fill)
        path = layout.dir / "img" / f"{i:05d}.jpg"
        im.save(path, quality=90)
        rows.append(dict(image_id=i, path=str(path), split="train", width=640, height=480))
    shards.write_table(layout.images, rows, "images")
    return layout


def make_demo(root: Path, test_images: int) -> shards.Layout:
    """The demo dataset with ``test_images`` test images (one of its shards at the default 100)."""
    generate(root, DemoConfig(images=2 * test_images, seed=CONFIG["demo_seed"],
                              image_size=CONFIG["demo_image_size"]), progress=False)
    return shards.Layout(root, "demo")


def demo_flags() -> list[str]:
    """The demo's extraction settings, as the workflow passes them."""
    c = CONFIG
    return ["--boxes", c["demo_boxes"], "--min-size", str(c["demo_min_size"]), "--max-size", str(c["demo_max_size"]),
            "--shard-size", str(c["demo_shard_size"]), "--batch-size", str(c["extract_batch_size"]), "--workers", "0",
            "--split", "test", "--chunk", "0"]


def adaptive_flags(workers: int) -> list[str]:
    return ["--boxes", "adaptive", "--min-size", "600", "--max-size", "1000", "--proposals", "300",
            "--batch-size", "1", "--workers", str(workers)]


# ---------------------------------------------------------------------------------------------
# jobs as Snakemake starts them

SUMMARY = re.compile(r"for (\d+) image\(s\) in ([\d.]+)s .*?model setup ([\d.]+)s, images ([\d.]+)s, CPU ([\d.]+)s")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def job(layout: shards.Layout, kind: str, flags: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "itmkit", "extract", "--dataset", layout.name, "--root", str(layout.root),
           "--kind", kind, "--weights", "random", "--device", "cpu", "--threads", str(threads), "--no-progress",
           *flags]
    t, cpu = time.perf_counter(), children_cpu()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu
    m = SUMMARY.search(p.stdout)
    if p.returncode != 0 or not m:
        raise SystemExit(f"extract benchmark: job failed ({' '.join(cmd)}):\n{p.stdout}{p.stderr[-3000:]}")
    profile = p.stderr[p.stderr.index("stage "):] if "--profile" in flags else ""
    return {"kind": kind, "wall": wall, "cpu": cpu, "images": int(m[1]), "setup": float(m[3]), "loop": float(m[4]),
            "loop_cpu": float(m[5]), "profile": profile}


def compare_ways(title: str, make, flags: list[str], threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        one = job(make(Path(tmp) / "one"), "both", [*flags, "--profile"], threads)
        two = make(Path(tmp) / "two")
        regions, grid = job(two, "regions", flags, threads), job(two, "grid", flags, threads)
    n = one["images"]
    two_jobs = {k: regions[k] + grid[k] for k in ("wall", "cpu", "loop", "loop_cpu")}
    print(f"\n{title}: {n} images; img/s by wall time, and by CPU seconds (steadier on a loaded machine)")
    print(f"  workflow's way, 1 job (both kinds, one pass)   {n / one['wall']:8.3f} img/s wall, "
          f"{n / one['cpu']:8.3f} per CPU-s   (job {one['wall']:.1f}s wall, {one['cpu']:.1f}s CPU; "
          f"model setup {one['setup']:.1f}s, images {one['loop']:.1f}s)")
    print(f"  old way, 2 jobs (regions, then grid)           {n / two_jobs['wall']:8.3f} img/s wall, "
          f"{n / two_jobs['cpu']:8.3f} per CPU-s   (jobs {regions['wall']:.1f}+{grid['wall']:.1f}s wall, "
          f"{regions['cpu']:.1f}+{grid['cpu']:.1f}s CPU; setup {regions['setup']:.1f}+{grid['setup']:.1f}s, "
          f"images {regions['loop']:.1f}+{grid['loop']:.1f}s)")
    print(f"  => per job as the workflow runs it: {two_jobs['wall'] / one['wall']:.2f}x by wall, "
          f"{two_jobs['cpu'] / one['cpu']:.2f}x by CPU; the images alone (no process start, no setup): "
          f"{two_jobs['loop'] / one['loop']:.2f}x by wall, {two_jobs['loop_cpu'] / one['loop_cpu']:.2f}x by CPU")
    print("  where the one job's time went (--profile):\n    " + one["profile"].strip().replace("\n", "\n    "))
    return one


# ---------------------------------------------------------------------------------------------
# the bare model

def random_model(cfg: ExtractorConfig, device: str) -> BottomUpRCNN:
    model = BottomUpRCNN(cfg)
    load_weights(model, "random")
    return model.to(device)


def decoded(layout: shards.Layout, cfg: ExtractorConfig, split: str | None = None):
    images = shards.read_table(layout.images, "images")
    rows = [i for i, s in enumerate(images["split"].to_pylist()) if split in (None, s)]
    paths, ids = images["path"].to_pylist(), images["image_id"].to_pylist()
    ims = [load_image(paths[i])[0] for i in rows]
    given = read_given_boxes(layout, images) if cfg.boxes == "given" else None
    return ([to_network_input(im, cfg.min_size, cfg.max_size) for im in ims], [(im.height, im.width) for im in ims],
            None if given is None else [torch.from_numpy(given[ids[i]]) for i in rows])


def bare_seconds(model, tensors, sizes, boxes, batch_size: int, device: str) -> float:
    """Seconds of the model on every image, batch by batch, from cold (as a job starts)."""
    sync(device)
    t = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        model(tensors[i:i + batch_size], sizes[i:i + batch_size], None if boxes is None else boxes[i:i + batch_size])
    sync(device)
    return time.perf_counter() - t


def overhead(title: str, layout, kind: str, split, batch_size: int, threads: int, runner_job: dict) -> None:
    """The bare model in a process of its own, as cold as the job it is compared with."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare", str(layout.root), kind, str(split),
           str(batch_size), "--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if p.returncode != 0:
        raise SystemExit(f"extract benchmark: bare model run failed:\n{p.stderr[-3000:]}")
    images, secs, cpu = map(float, p.stdout.split()[-3:])
    n = runner_job["images"]
    print(f"\n{title}: runner (1 job, both kinds) against the bare model (regions + grid on pre-decoded "
          f"tensors, nothing written), {n} images: wall {runner_job['loop']:.1f}s vs {secs:.1f}s, overhead "
          f"{runner_job['loop'] / secs * images / n:.2f}x; CPU {runner_job['loop_cpu']:.1f}s vs {cpu:.1f}s, "
          f"overhead {runner_job['loop_cpu'] / cpu * images / n:.2f}x")


def bare_child(root: str, kind: str, split: str, batch_size: str) -> None:
    """``--bare``: prints the number of images and the seconds the bare model took on them."""
    cfg = DEMO_CFG if kind == "demo" else BIG_CFG
    layout = shards.Layout(Path(root), "demo" if kind == "demo" else "bench")
    tensors, sizes, boxes = decoded(layout, cfg, None if split == "None" else split)
    model = random_model(cfg, "cpu")
    cpu = time.process_time()
    secs = bare_seconds(model, tensors, sizes, boxes, int(batch_size), "cpu")
    print(len(tensors), secs, time.process_time() - cpu)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# half precision against float32

def amp_difference(cfg: ExtractorConfig, tensors, sizes, device: str) -> dict:
    """float32 against autocast (float16 on CUDA, bfloat16 on CPU) with the same random weights:
    region features and labels on the float32 model's own boxes, grid features, and the boxes
    that adaptive selection keeps."""
    full = random_model(dataclasses.replace(cfg, amp=False), device)
    half = BottomUpRCNN(dataclasses.replace(cfg, amp=True)).to(device)
    half.load_state_dict(full.state_dict())
    rel, grid_rel, obj, attr, kept, counts = [], [], [], [], [], []
    for x, s in zip(tensors, sizes):
        a = full([x], [s])[0]                              # adaptive selection in float32
        given = [a["boxes"].cpu()]
        a, b = full([x], [s], given)[0], half([x], [s], given)[0]   # the same boxes in both precisions
        rel.append(float(((b["features"] - a["features"]).norm(dim=1) / a["features"].norm(dim=1).clamp_min(1e-12)).max()))
        grid_rel.append(float((b["grid"] - a["grid"]).norm(dim=1).div(a["grid"].norm(dim=1).clamp_min(1e-12)).max()))
        obj.append(float((b["obj_labels"] == a["obj_labels"]).float().mean()))
        attr.append(float((b["attr_labels"] == a["attr_labels"]).float().mean()))
        c = half([x], [s])[0]                              # adaptive selection under AMP
        iou = box_iou(a["boxes"], c["boxes"]) if len(c["boxes"]) else torch.zeros(len(a["boxes"]), 1)
        kept.append(float((iou.max(dim=1).values >= 0.9).float().mean()))
        counts.append((len(a["boxes"]), len(c["boxes"])))
    return {"dtype": "float16" if device.startswith("cuda") else "bfloat16", "images": len(tensors),
            "feature_rel_max": max(rel), "feature_rel_median": float(np.median(rel)), "grid_rel_max": max(grid_rel),
            "obj_agree": float(np.mean(obj)), "attr_agree": float(np.mean(attr)),
            "boxes_kept": float(np.mean(kept)), "box_counts": counts}


def print_amp(r: dict, where: str) -> None:
    print(f"\nAMP ({r['dtype']}) against float32, {where}, {r['images']} image(s), RANDOM weights:")
    print(f"  region features on the same boxes: max relative difference (L2 per region) "
          f"{r['feature_rel_max']:.4f} (median image {r['feature_rel_median']:.4f}); grid cells {r['grid_rel_max']:.4f}")
    print(f"  labels on the same boxes: objects {100 * r['obj_agree']:.1f}% agree, "
          f"attributes {100 * r['attr_agree']:.1f}%")
    print(f"  adaptive boxes: {100 * r['boxes_kept']:.1f}% of the float32 boxes kept under AMP (IoU >= 0.9); "
          f"box counts float32/AMP {r['box_counts']}")


# ---------------------------------------------------------------------------------------------
# planning the COCO DAG

COCO = {"train": 113_287, "val": 5_000, "test": 5_000}   # the Karpathy split: 123,287 images


def fake_coco(work: Path) -> dict:
    src = work / "raw" / "coco"
    (src / "images").mkdir(parents=True)
    (src / "dataset_coco.json").write_text("{}")   # only its existence is checked by a dry run
    (work / "weights.pkl").write_bytes(b"not read by a dry run")
    split = np.repeat(list(COCO), list(COCO.values()))
    ids = np.arange(len(split))
    layout = shards.Layout(work / "data", "coco")
    shards.write_table(layout.images, {"image_id": ids, "path": [f"{src}/images/{i}.jpg" for i in ids],
                                       "split": split.tolist(), "width": np.full(len(ids), 640),
                                       "height": np.full(len(ids), 480)}, "images")
    caps = np.arange(5 * len(ids))
    shards.write_table(layout.captions, {"caption_id": caps, "image_id": caps // 5, "split": np.repeat(split, 5).tolist(),
                                         "text": ["a cat on a mat"] * len(caps)}, "captions")
    return {"root": str(work / "data"), "runs": str(work / "runs"), "weights": str(work / "weights.pkl"),
            "coco_source_root": str(src)}


def plan() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = fake_coco(Path(tmp))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", tmp, "features_coco",
               "-n", "--cores", "16", "--config", *(f"{k}={v}" for k, v in cfg.items())]
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        secs = time.perf_counter() - t
    out = p.stdout + p.stderr
    table = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\ntotal\s+(\d+)", out, re.S)
    if p.returncode != 0 or not table:
        raise SystemExit(f"extract benchmark: the dry run failed:\n{out[-3000:]}")
    jobs = ", ".join(" ".join(line.split()) for line in table.group(1).splitlines())
    print(f"\nplanning: `snakemake -n features_coco` on a fake ingest of {sum(COCO.values()):,} images and "
          f"{5 * sum(COCO.values()):,} captions: {secs:.1f} s wall ({table.group(2)} jobs: {jobs})")


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the model, in every job and here (default 1: fastest on busy cores)")
    p.add_argument("--demo-images", type=int, default=CONFIG["demo_shard_size"],
                   help=f"demo test images, one shard (default {CONFIG['demo_shard_size']})")
    p.add_argument("--adaptive-images", type=int, default=3, help="600x1000 images for adaptive boxes (default 3)")
    p.add_argument("--amp-images", type=int, default=2, help="600x1000 images for the AMP comparison (default 2)")
    p.add_argument("--workers", type=int, default=1, help="decoding workers of the 600x1000 jobs (default 1)")
    p.add_argument("--device", default="cpu", help="device of the AMP comparison (default cpu)")
    p.add_argument("--bare", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bare:
        torch.set_num_threads(args.threads)
        bare_child(*args.bare)
        return 0
    parts = args.parts.split(",")
    if set(parts) - set(PARTS):
        p.error(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; parts are {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()}: CPU, {os.cpu_count()} cores, torch threads "
          f"{args.threads}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    if "way" in parts or "overhead" in parts:
        demo_job = compare_ways(f"given boxes at the demo size ({CONFIG['demo_min_size']} px)",
                                lambda r: make_demo(r, args.demo_images), demo_flags(), args.threads)
        big_job = compare_ways("adaptive boxes at 600x1000 (640x480 -> 600x800, 300 proposals)",
                               lambda r: make_jpegs(r, args.adaptive_images), adaptive_flags(args.workers), args.threads)
        if "overhead" in parts:
            with tempfile.TemporaryDirectory() as tmp:
                overhead("demo size, given boxes", make_demo(Path(tmp), args.demo_images), "demo", "test",
                         CONFIG["extract_batch_size"], args.threads, demo_job)
                overhead("600x1000, adaptive boxes", make_jpegs(Path(tmp), args.adaptive_images), "adaptive", None, 1,
                         args.threads, big_job)
    if "amp" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            tensors, sizes, _ = decoded(make_jpegs(Path(tmp), args.amp_images, seed=1), BIG_CFG)
        print_amp(amp_difference(BIG_CFG, tensors, sizes, args.device), "600x1000, adaptive boxes")
    if "plan" in parts:
        plan()
    print(f"# load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
