"""Draw a run's training loss and validation rSum per epoch to a PNG.

    python training/plot.py runs/NAME [runs/OTHER ...] [--out curves.png]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.shards import atomic_path  # noqa: E402


def read_metrics(run_dir) -> dict[str, list[float]]:
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv (has the run finished an epoch?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: [float(r[k]) for r in rows] for k in ("epoch", "train_loss", "rsum")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    args = p.parse_args(argv)
    fig, (ax_loss, ax_rsum) = plt.subplots(1, 2, figsize=(10, 4))
    for run in args.runs:
        m = read_metrics(run)
        ax_loss.plot(m["epoch"], m["train_loss"], marker="o", label=Path(run).name)
        ax_rsum.plot(m["epoch"], m["rsum"], marker="o", label=Path(run).name)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_rsum.set(xlabel="epoch", ylabel="rSum", title="validation rSum")
    for ax in (ax_loss, ax_rsum):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out or Path(args.runs[0]) / "curves.png")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"plot: {len(args.runs)} run(s) -> {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except FileNotFoundError as e:
        print(f"plot: error: {e}", file=sys.stderr)
        sys.exit(1)
