"""Shortlist and re-rank against full scoring: cross-attention runs re-scoring the top K of a
two-tower run, on trained runs of one dataset.

    python benchmarks/compare.py --root ROOT --out RUNS --models vsepp,cimn,kidrr,resg,dsrln ...  # trains
    python benchmarks/rerank.py --runs RUNS [--models kidrr,resg,dsrln] [--shortlisters vsepp,cimn]
           [--topk 10,20,50,100] [--fuse 0.25,0.5,0.75] [--split test] [--eval-images N] [--threads 1]

RUNS holds one run per model, named by the model (compare.py's --out); a run whose training
stopped before its last epoch is resumed first (train --resume). For each re-ranking model:
full scoring of the split (every pair, ``compute_sims``), then for each shortlister its full
scoring (one matrix product) and, for each K, the model re-scoring the K best candidates of every
query in both directions (``training/shortlist.py``, as ``evaluate.py --shortlist`` does). Each
cell reports rSum (f30k-1k protocol), the shortlist's recall@K (the share of image / caption queries
with a ground truth among their K candidates: the bound on what re-ranking reaches), the
hard-negative accuracies per kind, the pairs scored
and the scoring seconds (loading runs not counted; a shortlisted cell counts the shortlister's
scoring, the top-K selection, the model encoding the split and scoring the pairs). Fusion rows
re-rank the same pair scores with ``--fuse`` weights, at no extra scoring cost.

Results are kept in RUNS/rerank.json cell by cell (with the load average while each ran), so a
stopped benchmark resumes with the cells not yet measured, and two processes (e.g. --models kidrr
and --models resg,dsrln) can fill the same file; the tables are printed from it. The
goal line names, per model and shortlister, the smallest K reaching at least 98 % of full
scoring's rSum in at most a tenth of its time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from pipeline import shards
from pipeline.shards import Layout
from training import checkpoint, train
from training.config import RunConfig
from training.data import eval_loaders
from training.evaluation import compute_sims, hard_negative_accuracy, recall_metrics
from training.run import load_run
from training.shortlist import Shortlist, rerank_split, split_shortlist

GOAL_RSUM, GOAL_SPEEDUP = 0.98, 10.0


def cell(i2t, t2i, image_ids, pairs: list, n_pairs: int, seconds: float, load: tuple) -> dict:
    """One measured configuration: rSum and recalls, hard-negative accuracy per kind, cost."""
    hn = hard_negative_accuracy(i2t, image_ids, pairs, t2i_sims=t2i) if pairs else {}
    return {"metrics": recall_metrics(i2t, t2i_sims=t2i),
            "hard_negatives": {k: v for k, v in hn.items() if isinstance(v, dict)},
            "pairs": int(n_pairs), "seconds": seconds, "load": [load[0], os.getloadavg()[0]]}


def finish_training(run_dir: Path) -> None:
    """Resume a run whose training stopped before its last epoch (train --resume, the run's own
    recipe): a benchmark of a half-trained model would say nothing about the trained one."""
    cfg, last = RunConfig.load(run_dir), run_dir / "last.pt"
    done, epochs = (checkpoint.load(last)["epoch"] + 1 if last.exists() else 0), cfg.model_cfg().epochs
    if done >= epochs:
        return
    print(f"rerank: {run_dir.name}: trained {done} of {epochs} epochs; resuming its training", file=sys.stderr)
    train.main(["--model", cfg.model, "--dataset", cfg.dataset, "--out", str(run_dir), "--resume", "--quiet"])


def measure(args, results: dict, save) -> None:
    for name in dict.fromkeys(args.models + args.shortlisters):
        finish_training(Path(args.runs) / name)
    for name in args.models:
        run = load_run(Path(args.runs) / name, args.root, split=args.split, max_images=args.eval_images)
        images, texts = eval_loaders(run.data, args.batch_size)
        layout = Layout(run.root, run.config.dataset)
        pairs = (shards.read_table(layout.hard_negatives, "hard_negatives").to_pylist()
                 if layout.hard_negatives.exists() else [])
        ids = run.data.image_ids
        full_key = f"{name}/full"
        if full_key not in results:
            print(f"rerank: {name}: scoring every pair", file=sys.stderr)
            load, t = os.getloadavg(), time.perf_counter()
            sims = compute_sims(run.model, images, texts)
            save(full_key, cell(sims, None, ids, pairs, sims.size, time.perf_counter() - t, load))
            del sims
        for fast in args.shortlisters:
            alone = f"{name}/{fast}"   # the shortlister on its own, on the same split, and its recall@K
            todo = [k for k in args.topk if f"{name}/{fast}@{k}" not in results]
            unbounded = [k for k in args.topk if str(k) not in results.get(alone, {}).get("recall_at_k", {})]
            if not todo and not unbounded:
                continue
            load = os.getloadavg()
            shortlist, fast_s = split_shortlist(Path(args.runs) / fast, run.data, max(args.topk),
                                                batch_size=args.batch_size)
            if alone not in results or unbounded:
                entry = results.get(alone) or cell(shortlist.sims, None, ids, pairs, shortlist.sims.size,
                                                   fast_s, load)
                entry["recall_at_k"] = {**entry.get("recall_at_k", {}), **{
                    str(k): Shortlist.from_sims(shortlist.sims, k).recall() for k in unbounded}}
                save(alone, entry)
            for k in todo:
                print(f"rerank: {name}: {fast} top {k}", file=sys.stderr)
                load, t = os.getloadavg(), time.perf_counter()
                top = Shortlist.from_sims(shortlist.sims, k)
                done = rerank_split(run.model, images, texts, top)
                seconds = fast_s + time.perf_counter() - t
                entry = cell(done.i2t, done.t2i, ids, pairs, done.pairs, seconds, load)
                entry["fused"] = {}
                for alpha in args.fuse:
                    i2t, t2i = top.rankings(done.scores, fuse=alpha)
                    entry["fused"][f"{alpha:g}"] = cell(i2t, t2i, ids, pairs, done.pairs, seconds, load)
                save(f"{name}/{fast}@{k}", entry)


def _hn(c: dict, kinds: list[str]) -> str:
    return "".join(f" {c['hard_negatives'][k]['i2t_acc']:.1f} / {c['hard_negatives'][k]['t2i_acc']:.1f} |"
                   if k in c["hard_negatives"] else " - |" for k in kinds)


def report(args, results: dict) -> None:
    kinds = sorted({k for c in results.values() for k in c.get("hard_negatives", {})})
    head = ("| model | scoring | rSum | % of full | shortlist R@K i2t / t2i % | pairs scored | seconds | speed-up |"
            + "".join(
        f" {k} i2t / t2i % |" for k in kinds))
    for name in args.models:
        full = results.get(f"{name}/full")
        if full is None:
            continue
        base, secs = full["metrics"]["rsum"], full["seconds"]

        def row(label, c, model=name, bound=None):
            m = c["metrics"]
            bound = f"{bound['i2t']:.1f} / {bound['t2i']:.1f}" if bound else "-"
            return (f"| {model} | {label} | {m['rsum']:.1f} | {100 * m['rsum'] / base:.1f} | {bound} | {c['pairs']:,} "
                    f"({100 * c['pairs'] / full['pairs']:.1f} %) | {c['seconds']:.1f} | "
                    f"{secs / c['seconds']:.1f}x |" + _hn(c, kinds))
        print(f"\n{name}: full scoring {full['pairs']:,} pairs in {secs:.1f} s (load "
              f"{full['load'][0]:.1f}-{full['load'][1]:.1f}); rSum {base:.1f}\n")
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        print(row("every pair", full))
        for fast in args.shortlisters:
            bounds = results.get(f"{name}/{fast}", {}).get("recall_at_k", {})
            if f"{name}/{fast}" in results:
                print(row(f"{fast} alone", results[f"{name}/{fast}"], fast))
            for k in args.topk:
                if (c := results.get(f"{name}/{fast}@{k}")) is not None:
                    print(row(f"{fast} top {k}", c, bound=bounds.get(str(k))))
        if args.fuse:
            print(f"\n{name}, fused with the shortlister (alpha * {name} + (1 - alpha) * shortlister, "
                  "standardised per query; same pairs and time):\n")
            print(head)
            print("|" + "---|" * (head.count("|") - 1))
            for fast in args.shortlisters:
                for k in args.topk:
                    bound = results.get(f"{name}/{fast}", {}).get("recall_at_k", {}).get(str(k))
                    for alpha, c in results.get(f"{name}/{fast}@{k}", {}).get("fused", {}).items():
                        print(row(f"{fast} top {k}, alpha {alpha}", c, bound=bound))
        for fast in args.shortlisters:
            hit = [k for k in args.topk if (c := results.get(f"{name}/{fast}@{k}")) is not None
                   and c["metrics"]["rsum"] >= GOAL_RSUM * base and secs / c["seconds"] >= GOAL_SPEEDUP]
            measured = [k for k in args.topk if f"{name}/{fast}@{k}" in results]
            if hit:
                c = results[f"{name}/{fast}@{hit[0]}"]
                print(f"goal: {name} shortlisted by {fast} reaches {100 * c['metrics']['rsum'] / base:.1f} % "
                      f"of full rSum at K = {hit[0]}, {secs / c['seconds']:.1f}x less scoring time")
            elif measured:
                print(f"goal: {name} shortlisted by {fast}: not reached at K in {measured} "
                      f"(>= {100 * GOAL_RSUM:.0f} % of rSum at >= {GOAL_SPEEDUP:.0f}x less time)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="folder with one run per model, named by the model")
    ap.add_argument("--models", default="kidrr,resg,dsrln", help="re-ranking runs (default: %(default)s)")
    ap.add_argument("--shortlisters", default="vsepp,cimn", help="two-tower runs (default: %(default)s)")
    ap.add_argument("--topk", default="10,20,50,100", help="K values (default: %(default)s)")
    ap.add_argument("--fuse", default="0.25,0.5,0.75", help="fusion weights of the re-ranking model; '' for "
                    "none (default: %(default)s)")
    ap.add_argument("--split", default="test", help="default: %(default)s")
    ap.add_argument("--root", default=None, help="data root (default: the one the runs were trained on)")
    ap.add_argument("--eval-images", type=int, default=None, help="first N images of the split (default: all)")
    ap.add_argument("--batch-size", type=int, default=128, help="images per block, captions 5x "
                    "(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--results", default=None, help="default: RUNS/rerank.json")
    ap.add_argument("--report-only", action="store_true", help="print the tables of what is measured")
    args = ap.parse_args(argv)
    for key in ("models", "shortlisters"):
        setattr(args, key, [m for m in getattr(args, key).split(",") if m])
    args.topk = sorted(int(k) for k in args.topk.split(",") if k)
    args.fuse = [float(a) for a in args.fuse.split(",") if a]
    torch.set_num_threads(args.threads)
    path = Path(args.results or Path(args.runs) / "rerank.json")
    results = shards.read_json(path) if path.exists() else {}

    def save(key: str, value: dict) -> None:   # merged under a claim: several processes may share the file
        with shards.claim(path):
            results.update(shards.read_json(path) if path.exists() else {})
            results[key] = value
            shards.write_json(path, results)

    if not args.report_only:
        measure(args, results, save)
    print(f"{args.split} split{f', first {args.eval_images} images' if args.eval_images else ''}; "
          f"{args.threads} thread(s); results in {path}")
    report(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
