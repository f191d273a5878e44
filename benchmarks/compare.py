"""Train several registered models on the same split with the same settings, evaluate them on
the same test images, and print one comparison table; with ``--seeds N`` each model is trained
N times (seeds --seed .. --seed+N-1) and every figure is the mean ± sample std over the seeds.

    python benchmarks/compare.py --dataset demo --root data --out runs/compare \\
        --models vsepp,cimn,dsrln,kidrr,resg --epochs 10 --batch-size 64 --seeds 3 \\
        --set embed_dim=256 --set kidrr:sim_dim=64 [--threads 1] [--eval-images 500]

Each run is the commands a user runs, in its own process: ``itmkit train`` into
``<out>/<model>-seed<S>`` and ``itmkit evaluate --hard-negatives`` (when the dataset has
hard-negative pairs). ``--set KEY=VALUE`` goes to every model, ``--set MODEL:KEY=VALUE`` to one.
A run that is complete and evaluated is not run again, and an interrupted run is resumed, so the
command can be repeated after a stop (or run for a few models at a time, then for all to print
the table); a run whose eval.json entry scored other weights than its best.pt holds now (it was
trained further since) is evaluated again, saying so. Chance is the expected rSum of random scores on the same number of test images.
Every run's figures go to ``<out>/compare.json`` too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline import shards
from pipeline.config import HelpFormatter, UsageError, add_root_argument, add_set_argument, positive_int, resolve_root
from training import models
from training.config import parse_run_settings

REPO = Path(__file__).resolve().parents[1]


def model_sets(items: list[str], name: str) -> list[str]:
    """The ``--set`` items for model ``name``: ``KEY=VALUE`` (every model) and ``name:KEY=VALUE``,
    checked against its config now rather than in its training process."""
    out = []
    for item in items:
        target, sep, rest = item.partition(":")
        if sep and "=" not in target:
            if target not in models.names():
                raise UsageError(f"--set {item}: unknown model '{target}'; the models: {', '.join(models.names())}")
            if target == name:
                out.append(rest)
        else:
            out.append(item)
    parse_run_settings(out, models.get(name).config_class)   # run settings (pair_batches, ...) too
    return out


def run(cmd: list[str], log: Path, env: dict) -> float:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"'{' '.join(cmd[1:3])} ...' failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - t


def not_current(run_dir: Path, key: str) -> str:
    """Why eval.json's ``key`` entry of ``run_dir`` cannot be used, or "" when it scored the
    run's best.pt as it is now (the sha256 evaluate records)."""
    path = run_dir / "eval.json"
    entry = (json.loads(path.read_text()) if path.exists() else {}).get(key)
    if entry is None:
        return "not evaluated"
    scored = entry.get("checkpoint") or {}
    best = run_dir / "best.pt"
    if best.exists() and scored.get("sha256") == shards.sha256_file(best):
        return ""
    what = f"{scored['file']} of epoch {scored['epoch']}" if scored else "weights it does not record"
    return f"its eval.json entry {key} scored {what}, not its best.pt as it is now"


def run_figures(result: dict, best_val: float, times: dict, key: str, split: str) -> dict:
    """The figures of one evaluated run, flat: name -> value."""
    m = result[key]
    out = {"train_s": times["train_s"], "eval_s": times.get("eval_s", 0.0), "best_val_rsum": best_val,
           **{k: m[k] for k in ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}}
    for kind, v in result.get(f"{split}/hard_negatives", {}).items():
        if isinstance(v, dict) and "i2t_acc" in v:   # a kind, not the "checkpoint" scored
            out[f"{kind}_i2t_acc"], out[f"{kind}_t2i_acc"] = v["i2t_acc"], v["t2i_acc"]
    return out


def mean_std(values: list[float], digits: int = 1) -> str:
    """``m`` for one value, ``m ± s`` (sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(rows: dict[str, list[dict]]) -> list[str]:
    """Markdown table, one row per model: mean ± std over its runs of every figure."""
    kinds = sorted({k[:-len("_i2t_acc")] for runs in rows.values() for r in runs for k in r
                    if k.endswith("_i2t_acc")})
    cols = [("train s", "train_s", 0), ("eval s", "eval_s", 0), ("best val rSum", "best_val_rsum", 1),
            ("test rSum", "rsum", 1)]
    cols += [(f"{d} R@{k}", f"{d}_r{k}", 1) for d in ("i2t", "t2i") for k in (1, 5, 10)]
    cols += [(f"{kind} {d} %", f"{kind}_{d}_acc", 1) for kind in kinds for d in ("i2t", "t2i")]
    lines = ["| model | seeds | " + " | ".join(c for c, _, _ in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for name, runs in rows.items():
        cells = [mean_std([r[key] for r in runs], digits) if all(key in r for r in runs) else "-"
                 for _, key, digits in cols]
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of a set of runs on one build: data, schedule, seeds, where to test."""
    ap.add_argument("--dataset", default="demo", help="dataset name (folder under the data root)")
    add_root_argument(ap)
    ap.add_argument("--out", required=True, help="folder of the runs, one per model and seed")
    ap.add_argument("--epochs", type=positive_int, required=True, help="epochs of every run")
    ap.add_argument("--batch-size", type=positive_int, required=True, help="batch size of every run")
    add_set_argument(ap, "a model config field of every model, or of one with MODEL:KEY=VALUE",
                     metavar="[MODEL:]KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--seeds", type=positive_int, default=1, help="runs per model, with seeds --seed, --seed+1, ...")
    ap.add_argument("--max-images", type=int, default=None, help="train on the first N images")
    ap.add_argument("--eval-images", type=int, default=None, help="test on the first N images")
    ap.add_argument("--split", default="test", help="split to test on")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--device", default="cpu", help="torch device")


def seeds_of(args) -> range:
    return range(args.seed, args.seed + args.seeds)


def train_and_evaluate(args, name: str, run_dir: Path, sets: list[str], seed: int) -> tuple[dict, dict]:
    """Train model ``name`` with ``--set`` items ``sets`` into ``run_dir`` and evaluate it, unless
    it is evaluated already (an interrupted training is resumed). Returns the run's figures
    (``run_figures``) and the chance level of its test images."""
    run_dir = Path(run_dir)
    log = run_dir.parent / f"{run_dir.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    py, key = sys.executable, f"{args.split}/f30k-1k"
    hard = (Path(args.root) / args.dataset / "hard_negatives.parquet").exists()
    timing_path = run_dir / "compare-times.json"
    times = json.loads(timing_path.read_text()) if timing_path.exists() else {"train_s": 0.0}
    why = not_current(run_dir, key)
    if why and why != "not evaluated":
        print(f"compare: {run_dir}: {why}: evaluating again", file=sys.stderr)
    if why:
        train = [py, "-m", "itmkit", "train", "--model", name, "--dataset", args.dataset, "--root", args.root,
                 "--out", str(run_dir), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--seed", str(seed), "--workers", "0", "--threads", str(args.threads), "--device", args.device]
        train += [a for s in sets for a in ("--set", s)]
        train += ["--max-images", str(args.max_images)] if args.max_images else []
        train += ["--resume"] if (run_dir / "config.json").exists() else []
        print(f"training {run_dir.name} (log {log})", file=sys.stderr)
        times["train_s"] += run(train, log, env)
        evaluate = [py, "-m", "itmkit", "evaluate", str(run_dir), "--root", args.root, "--split", args.split,
                    "--protocol", "f30k-1k", "--workers", "0", "--threads", str(args.threads),
                    "--device", args.device]
        evaluate += ["--hard-negatives"] if hard else []
        evaluate += ["--max-images", str(args.eval_images)] if args.eval_images else []
        print(f"evaluating {run_dir.name}", file=sys.stderr)
        times["eval_s"] = run(evaluate, log, env)
        timing_path.write_text(json.dumps(times))
    result = json.loads((run_dir / "eval.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        best_val = max(float(r["rsum"]) for r in csv.DictReader(f))
    chance = {"images": result[key]["images"], "rsum": result[key]["chance_rsum"]}
    return run_figures(result, best_val, times, key, args.split), chance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_run_arguments(ap)
    ap.add_argument("--models", default=",".join(models.names()), help="comma-separated registered models")
    args = ap.parse_args(argv)
    args.root = str(resolve_root(args.root))

    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in models.names()]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(models.names())}")
    try:
        for name in names:
            model_sets(args.set, name)
    except UsageError as e:
        ap.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {}
    chance = {}
    for name in names:
        for seed in seeds_of(args):
            figures, chance = train_and_evaluate(args, name, out / f"{name}-seed{seed}",
                                                 model_sets(args.set, name), seed)
            rows.setdefault(name, []).append(figures)

    print(f"\n{describe(args)}\n")
    print("\n".join(table(rows)))
    print(f"\nrandom scores on {chance['images']} test images: rSum {chance['rsum']:.1f}; "
          "hard-negative pairs: 50 %")
    shards.write_json(out / "compare.json", {"args": vars(args), "chance": chance, "runs": rows})
    return 0


def describe(args) -> str:
    """One line: what the runs were (build, schedule, overrides, seeds)."""
    seeds = f"seed {args.seed}" if args.seeds == 1 else f"seeds {args.seed}..{args.seed + args.seeds - 1} (mean ± std)"
    return (f"{args.dataset}/{args.split}, {args.epochs} epochs, batch {args.batch_size}, "
            f"--set {' '.join(args.set) or '(none)'}; {seeds}")


if __name__ == "__main__":
    sys.exit(main())
