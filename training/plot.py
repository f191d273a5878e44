"""Draw runs' training loss and validation rSum per epoch to a PNG.

    itmkit plot runs/NAME [runs/OTHER ...] [--out curves.png]   # or: python training/plot.py ...

One loss panel (log scale) for all runs, then one rSum panel per validation size, each with the
rSum that random scores get on that many images (dashed): rSums on different numbers of images
are not comparable, so runs validated on different sizes are not drawn on one axis.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.config import add_quiet_argument, run_command  # noqa: E402
from pipeline.shards import atomic_path  # noqa: E402

ERRORS = (FileNotFoundError, ValueError)   # what itmkit reports as one line (exit 1)


def read_metrics(run_dir) -> dict[str, list[float]]:
    """Per-epoch columns of metrics.csv; ``val_images`` and ``chance_rsum`` are empty for runs
    written before they were recorded."""
    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv (has the run finished an epoch?)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise FileNotFoundError(f"{path}: no rows (has the run finished an epoch?)")
    out = {k: [float(r[k]) for r in rows] for k in ("epoch", "train_loss", "rsum")}
    for k in ("val_images", "chance_rsum"):
        out[k] = [float(r[k]) if r.get(k) else None for r in rows]
    return out


def draw(runs: list[str]) -> plt.Figure:
    """The figure: the loss panel, then one rSum panel per validation size."""
    metrics = {run: read_metrics(run) for run in runs}
    sizes = sorted({m["val_images"][-1] for m in metrics.values()}, key=lambda s: (s is None, s))
    fig, axes = plt.subplots(1, 1 + len(sizes), figsize=(5 * (1 + len(sizes)), 4), squeeze=False)
    ax_loss, rsum_axes = axes[0, 0], dict(zip(sizes, axes[0, 1:]))
    for run, m in metrics.items():
        label = Path(run).name
        ax_loss.plot(m["epoch"], m["train_loss"], marker="o", label=label)
        rsum_axes[m["val_images"][-1]].plot(m["epoch"], m["rsum"], marker="o", label=label)
    positive = all(v > 0 for m in metrics.values() for v in m["train_loss"])
    ax_loss.set_yscale("log" if positive else "symlog")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    for size, ax in rsum_axes.items():
        chance = next((m["chance_rsum"][-1] for m in metrics.values() if m["val_images"][-1] == size), None)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle="--", label=f"chance ({chance:.1f})")
        title = f"validation rSum, {size:.0f} images" if size is not None else "validation rSum (size not recorded)"
        ax.set(xlabel="epoch", ylabel="rSum", title=title)
    last_epoch = max(max(m["epoch"]) for m in metrics.values())
    for ax in axes[0]:
        ax.set_xlim(0.5, last_epoch + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run folders written by itmkit train")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    add_quiet_argument(p)


def main(argv=None) -> int:
    """``itmkit plot`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    out = Path(args.out or Path(args.runs[0]) / "curves.png")
    fig = draw(args.runs)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"plot: {len(args.runs)} run(s), {len(fig.axes) - 1} validation size(s) -> {out}")
    return 0


if __name__ == "__main__":   # python training/plot.py ...: the same as itmkit plot ...
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"plot: error: {e}")
