"""Switch a model's components off one at a time and say which of them matter.

    python benchmarks/ablate.py --model cimn --dataset demo --root data --out runs/ablate \\
        --epochs 10 --batch-size 64 --seeds 3 --set embed_dim=256 [--cells no-frr,triplet-loss]

Every cell of the model's row in ``CELLS`` (plus ``full``, the model as configured) is trained and
evaluated with seeds --seed .. --seed+N-1 on the same build, with the same settings and the
cell's ``--set`` overrides, by ``compare.py``'s machinery: runs go to ``<out>/<model>-<cell>-seed<S>``,
an evaluated run is reused and an interrupted one resumed, so the command can be repeated after a
stop (or run with ``--cells`` for a few cells at a time).

Per cell and figure (test rSum, and the pairwise accuracy of every hard-negative kind in
eval.json, the mean of its two directions): mean ± sample std over the seeds, the difference
Δ = cell − full and its standard error σ = sqrt(s_cell²/n_cell + s_full²/n_full) (Welch), and a
verdict on the component that the cell removes: "helps" when removing it lowers the figure by
more than 2σ, "hurts" when it raises it by more than 2σ, else "no measurable difference". The
table is printed as markdown and saved as ``<out>/ablate-<model>.csv`` and ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

from pipeline import shards  # noqa: E402
from pipeline.config import HelpFormatter, UsageError, resolve_root  # noqa: E402

# model -> cells: (name, --set overrides that switch one component off)
CELLS: dict[str, list[tuple[str, list[str]]]] = {
    "cimn": [("no-frr", ["frr_layers=0"]),
             ("mean-pooling", ["pooling=mean"]),
             ("triplet-loss", ["loss=triplet"]),
             ("no-intra-terms", ["gl_intra=0"])],
    "dsrln": [("no-gisa-geometry", ["box_geometry=false"]),
              ("no-geometry-weight", ["geometry_weight=false"]),
              ("no-geometry-interaction", ["geometry_interaction=false"]),
              ("no-dif", ["grid_fusion=false"])],
    "kidrr": [("no-dissemination", ["kid_iters=0"]),
              ("no-reconstruction", ["reconstruct=false"])],
    "resg": [("no-vreg", ["vreg=false"]),
             ("no-treg", ["treg=false"]),
             ("no-center-hinge", ["center_weight=0"]),
             ("no-pos-neg-margin", ["pn_weight=0"])],
}
FULL = "full"


def compare_to_full(full: list[float], cell: list[float]) -> dict:
    """Mean and sample std of ``cell``, its difference to the mean of ``full`` and the standard
    error of that difference (Welch: sqrt(s_c²/n_c + s_f²/n_f)); the verdict is on the removed
    component, from Δ against 2σ. With one value on either side σ is unknown (None): no verdict."""
    mean = statistics.mean(cell)
    std = statistics.stdev(cell) if len(cell) > 1 else None
    diff = mean - statistics.mean(full)
    se = None
    if len(cell) > 1 and len(full) > 1:
        se = math.sqrt(statistics.variance(cell) / len(cell) + statistics.variance(full) / len(full))
    if se is None:
        verdict = "one seed: no σ"
    elif diff < -2 * se:
        verdict = "helps (> 2σ)"
    elif diff > 2 * se:
        verdict = "hurts (> 2σ)"
    else:
        verdict = "no measurable difference"
    return {"n": len(cell), "mean": mean, "std": std, "diff": diff, "se": se, "verdict": verdict}


def figures(run: dict) -> dict[str, float]:
    """The figures a cell is judged on, from one run's ``compare.run_figures``: test rSum and,
    per hard-negative kind, the mean accuracy of its two directions (%)."""
    out = {"test rSum": run["rsum"]}
    for key in sorted(run):
        if key.endswith("_i2t_acc"):
            kind = key[:-len("_i2t_acc")]
            out[f"{kind} %"] = (run[key] + run[f"{kind}_t2i_acc"]) / 2
    return out


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per (cell, figure): ``compare_to_full`` of the cell's runs against ``full``'s."""
    full = [figures(r) for r in runs[FULL]]
    rows = []
    for cell, cell_runs in runs.items():
        per_run = [figures(r) for r in cell_runs]
        for fig in full[0]:
            if all(fig in r for r in per_run):
                stats = compare_to_full([r[fig] for r in full], [r[fig] for r in per_run])
                rows.append({"cell": cell, "figure": fig, **stats})
    return rows


def _pm(value: float, err: float | None, sign: bool = False) -> str:
    text = f"{value:+.1f}" if sign else f"{value:.1f}"
    return text if err is None else f"{text} ± {err:.1f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| cell | figure | seeds | mean ± std | Δ vs full ± σ | component |", "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if r["cell"] == FULL else _pm(r["diff"], r["se"], sign=True)
        verdict = "—" if r["cell"] == FULL else r["verdict"]
        lines.append(f"| {r['cell']} | {r['figure']} | {r['n']} | {_pm(r['mean'], r['std'])} | {delta} | {verdict} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    compare.add_run_arguments(ap)
    ap.add_argument("--model", required=True, choices=sorted(CELLS), help="model whose components are switched off")
    ap.add_argument("--cells", default=None,
                    help="comma-separated cells to run besides full (default: all of the model's)")
    args = ap.parse_args(argv)
    args.root = str(resolve_root(args.root))

    known = dict(CELLS[args.model])
    chosen = list(known) if args.cells is None else [c for c in args.cells.split(",") if c and c != FULL]
    unknown = [c for c in chosen if c not in known]
    if unknown:
        ap.error(f"--cells: unknown cell(s) {unknown} of {args.model}; its cells: {', '.join(known)}")
    cells = [(FULL, [])] + [(c, known[c]) for c in chosen]
    try:
        base = compare.model_sets(args.set, args.model)
        for cell, overrides in cells:
            compare.model_sets(base + overrides, args.model)
    except UsageError as e:
        ap.error(str(e))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {}
    for cell, overrides in cells:   # cell by cell: a stopped command leaves whole cells behind
        for seed in compare.seeds_of(args):
            run, _ = compare.train_and_evaluate(args, args.model, out / f"{args.model}-{cell}-seed{seed}",
                                                base + overrides, seed)
            runs.setdefault(cell, []).append(run)

    rows = summarise(runs)
    print(f"\n{args.model}: {compare.describe(args)}; Δ = cell − full, σ = its standard error "
          "(Welch); a component helps when removing it lowers the figure by more than 2σ\n")
    print("\n".join(table(rows)))
    stem = out / f"ablate-{args.model}"
    with shards.atomic_path(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shards.write_json(stem.with_suffix(".json"),
                      {"args": vars(args), "cells": dict(cells), "summary": rows, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
