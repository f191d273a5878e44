"""Training samples/s of each model on the demo data, trained the way `snakemake demo` trains.

    python benchmarks/train_speed.py [--root /tmp/itmkit-train-speed/data] [--out /tmp/itmkit-train-speed/runs]
        [--models vsepp,cimn,dsrln,kidrr,resg] [--epochs 2] [--max-images 48] [--threads 1] [--set KEY=VALUE ...]

The data is the demo's, in the data root --root: reused when ROOT/demo has region and grid shards
and a vocabulary (e.g. the data/ of a `snakemake demo` run), else built there by the workflow's own
targets (config/config.yaml's demo_* settings: images, given boxes, RANDOM extractor weights,
scene graphs, vocabulary; a few minutes). Each model then trains in its own process with
``itmkit train`` into OUT/MODEL, with the demo's recipe (``demo_batch_size`` and ``demo_set``;
the model's own defaults otherwise) for --epochs epochs on the first --max-images training images
(0: all of them), validating on the val split after every epoch as the trainer does.

Per model: training pairs/s of the training loop (metrics.csv ``train_seconds``: loading, forward,
backward, optimiser step, logging), over all epochs and over the epochs after the first (the first
pays one-time costs); validation and checkpoint seconds per epoch; the whole command's wall
seconds and CPU seconds (process start, imports, opening and hashing the shards included).
``--set KEY=VALUE`` overrides the recipe for every model (e.g. ``embed_dim=1024``: the demo's size
before it became 256). ``--threads N`` is train.py's (1, as the demo trains; 0: torch's choice,
one thread per core). On a shared machine, read the figures with the load average it prints.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.shards import Layout

REPO = Path(__file__).resolve().parents[1]
MODELS = "vsepp,cimn,dsrln,kidrr,resg"


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def build_demo(root: Path, workdir: Path) -> None:
    """The demo's region and grid shards, graphs and vocabulary in the data root ``root``: reused
    when there, else made by the workflow's targets (snakemake's bookkeeping goes to ``workdir``)."""
    data = root / "demo"
    index = Layout(root, "demo").index if (data / "shards.json").exists() else None
    if index and index.entries("regions") and index.entries("grid") and (data / "text" / "vocab.json").exists():
        print(f"demo data: {data} (reused)", flush=True)
        return
    targets = [data / ".workflow" / "regions.done", data / ".workflow" / "grid.done", data / "text" / "vocab.json"]
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *map(str, targets), "--config", f"root={root}", f"runs={workdir}"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"train_speed: building the demo data failed:\n{(done.stdout + done.stderr)[-3000:]}")
    print(f"demo data: {data} (built in {time.perf_counter() - t:.0f} s)", flush=True)


def cpu_seconds_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train_one(model: str, args, recipe: list[str], env: dict) -> dict:
    out = Path(args.out) / model
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "itmkit", "train", "--model", model, "--dataset", "demo",
           "--root", args.root, "--out", str(out), "--epochs", str(args.epochs),
           "--device", "cpu", "--workers", "0", "--threads", str(args.threads), "--quiet", *recipe]
    if args.max_images:
        cmd += ["--max-images", str(args.max_images)]
    cpu, t = cpu_seconds_of_children(), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall, cpu = time.perf_counter() - t, cpu_seconds_of_children() - cpu
    if done.returncode:
        return {"model": model, "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    batch = json.loads((out / "config.json").read_text())["model_config"]["batch_size"]
    pairs = int(rows[0]["step"]) * batch            # pairs of one epoch's full batches
    loop = [float(r["train_seconds"]) for r in rows]
    epoch = [float(r["seconds"]) for r in rows]
    later = loop[1:] or loop
    return {"model": model, "pairs": pairs, "epochs": len(rows),
            "all": pairs * len(loop) / sum(loop), "later": pairs * len(later) / sum(later),
            "val": sum(e - lp for e, lp in zip(epoch, loop)) / len(rows),
            "wall": wall, "cpu": cpu, "rsum": float(rows[-1]["rsum"])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/itmkit-train-speed/data",
                   help="data root holding (or to hold) the demo dataset (default /tmp/itmkit-train-speed/data)")
    p.add_argument("--out", default="/tmp/itmkit-train-speed/runs",
                   help="folder of the runs, one per model, replaced (default /tmp/itmkit-train-speed/runs)")
    p.add_argument("--models", default=MODELS, help=f"comma-separated (default {MODELS})")
    p.add_argument("--epochs", type=int, default=2, help="epochs per model (default 2)")
    p.add_argument("--max-images", type=int, default=48,
                   help="train on the first N training images, 5 pairs each; 0: all (default 48)")
    p.add_argument("--threads", type=int, default=1,
                   help="train.py --threads: CPU threads per run (default 1, as the demo trains; 0: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the demo recipe for every model (default: none)")
    args = p.parse_args(argv)

    args.root, args.out = str(Path(args.root).absolute()), str(Path(args.out).absolute())
    build_demo(Path(args.root), Path(args.out))
    cfg = demo_config()
    recipe = ["--batch-size", str(cfg["demo_batch_size"])]
    for key, value in {**(cfg.get("demo_set") or {}), **dict(s.split("=", 1) for s in args.set)}.items():
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        recipe += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"recipe: {' '.join(recipe)}, {args.epochs} epoch(s), "
          f"{args.max_images or 'all'} training images; threads {args.threads or 'torch default'}; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    print("| model | pairs/epoch | train pairs/s (all epochs) | (after the first) | validation + checkpoint s/epoch "
          "| command wall s | command CPU s | last val rSum |\n|---|---|---|---|---|---|---|---|", flush=True)
    for model in args.models.split(","):
        r = train_one(model, args, recipe, env)
        if "error" in r:
            print(f"| {model} | failed: {r['error']} |||||||", flush=True)
            continue
        print(f"| {model} | {r['pairs']} | {r['all']:.1f} | {r['later']:.1f} | {r['val']:.2f} | {r['wall']:.1f} "
              f"| {r['cpu']:.1f} | {r['rsum']:.1f} |", flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
