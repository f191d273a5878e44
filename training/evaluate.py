"""Evaluate a run as the image-text matching literature does.

    itmkit evaluate runs/NAME [--split test] [--protocol f30k-1k|coco-5k|coco-1k|eccv|cxc]
           [--checkpoint best|last] [--save-sims] [--hard-negatives] [--max-images N]
           [--export-index DIR]
    itmkit evaluate --ensemble runs/A runs/B [--split test]   # averages saved sims

``python training/evaluate.py ...`` is the same as ``itmkit evaluate ...``.

Results are printed and merged into <run>/eval.json under "<split>/<protocol>" (an ensemble's
into eval-ensemble.json of RUN, else of its first member, with the member runs). A part that
cannot run (a protocol the split does not fit, hard negatives on a dataset without pairs, an
index of a cross-attention model) is skipped with one line saying why; the rest is computed and
saved.
The data root defaults to the one the run was trained on.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np

from pipeline import shards
from pipeline.config import UsageError, add_quiet_argument, add_root_argument, positive_int, run_command
from pipeline.shards import Layout, ShardError
from training import models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.data import CaptionDataset, ImageDataset, collate_images, collate_text, make_loader
from training.evaluation import (PROTOCOLS, compute_sims, hard_negative_accuracy, protocol_result,
                                 small_split_warning)
from training.run import add_run_arguments, data_root, load_run

ERRORS = (ShardError, CheckpointError, ValueError)   # what itmkit reports as one line (exit 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run folder written by itmkit train")
    p.add_argument("--split", default="test", help="split to score")
    p.add_argument("--protocol", choices=PROTOCOLS, action="append",
                   help="default: coco-1k and coco-5k for COCO datasets, else f30k-1k; eccv and cxc "
                   "(COCO 5K test with COCO's ids, docs/training.md) on request")
    add_run_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=128, help="images per block, captions: 5x")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--save-sims", action="store_true", help="write <run>/sims-<split>.npz")
    p.add_argument("--ensemble", nargs="+", metavar="RUN",
                   help="average the saved sims (--save-sims) of these runs; the results go to "
                        "eval-ensemble.json in the positional run folder, else in the first of these")
    p.add_argument("--hard-negatives", action="store_true",
                   help="pairwise accuracy on the dataset's hard_negatives.parquet pairs")
    p.add_argument("--max-images", type=int, default=None,
                   help="score only the first N images of the split and their captions (quick checks; "
                        "default: all)")
    p.add_argument("--fold-size", type=positive_int, default=1000, help="images per coco-1k fold")
    p.add_argument("--export-index", metavar="DIR", help="two-tower models: also write the image and "
                   "caption embeddings (float16 + ids) to DIR for a vector index (training/export.py)")
    add_quiet_argument(p)


def sims_path(run_dir, split: str) -> Path:
    return Path(run_dir) / f"sims-{split}.npz"


def save_sims(path: Path, sims, image_ids, caption_ids, meta: dict) -> None:
    with shards.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sims=sims.astype(np.float32), image_ids=image_ids, caption_ids=caption_ids,
                 dataset=meta["dataset"], shard_hashes=str(sorted(meta["shard_hashes"].items())))


def load_sims(path: Path) -> dict:
    """The arrays of a sims-<split>.npz; plain arrays only (``allow_pickle=False``: an object
    array, whose loading could run code, is refused)."""
    if not path.exists():
        raise CheckpointError(f"{path}: no saved similarities; run `itmkit evaluate RUN --save-sims` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:    # object arrays
        raise CheckpointError(f"{path}: refused: {e} (itmkit writes plain arrays only)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read saved similarities (truncated or corrupt?): {e}") from None


def ensemble_sims(members: list[str], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The mean of the members' saved ``split`` similarities, their image and caption ids, dataset."""
    saved = [load_sims(sims_path(r, split)) for r in members]
    for r, s in zip(members[1:], saved[1:]):
        if not (np.array_equal(s["image_ids"], saved[0]["image_ids"])
                and np.array_equal(s["caption_ids"], saved[0]["caption_ids"])):
            raise CheckpointError(f"{r}: saved sims cover other images/captions than {members[0]}")
    first = saved[0]
    return (np.mean([s["sims"] for s in saved], axis=0), first["image_ids"], first["caption_ids"],
            str(first["dataset"]))


def main(argv=None) -> int:
    """``itmkit evaluate`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    if not args.run and not args.ensemble:
        raise UsageError("give a run folder (or --ensemble RUN1 RUN2 ...)")
    written, skipped = [], []

    def skip(part: str, why: str) -> None:
        skipped.append(part)
        print(f"evaluate: skipped {part}: {why}", file=sys.stderr)

    if args.ensemble:
        members = args.ensemble
        sims, image_ids, caption_ids, dataset = ensemble_sims(members, args.split)
        out = Path(args.run or members[0]) / "eval-ensemble.json"
        tag = {"runs": [str(m) for m in members]}
        root = data_root(RunConfig.load(members[0]), args.root) if args.hard_negatives else None
        what = f"ensemble of {len(members)} runs"
        for flag in ("--save-sims", "--export-index"):
            if getattr(args, flag[2:].replace("-", "_")):
                skip(flag, "an ensemble averages saved similarities; it has no model of its own")
    else:
        run = load_run(args.run, args.root, which=args.checkpoint, device=args.device, split=args.split,
                       max_images=args.max_images)
        data = run.data
        two_tower = models.get(run.config.model).two_tower
        if args.export_index and not two_tower:   # said before the scoring, which may take long
            skip("--export-index", f"model '{run.config.model}' is a cross-attention model: its scores "
                 "need the image and the caption together, so it has no per-item embeddings to index")
        images = make_loader(ImageDataset(data), partial(collate_images, half=True), args.batch_size,
                             workers=args.workers)
        texts = make_loader(CaptionDataset(data), collate_text, args.batch_size * 5, workers=args.workers)
        sims = compute_sims(run.model, images, texts, args.device, progress=not args.quiet)
        image_ids, caption_ids = data.image_ids, data.text.caption_ids
        dataset, root = run.config.dataset, run.root
        out, tag, what = run.dir / "eval.json", {}, f"{args.run} ({args.checkpoint}.pt)"
        if args.save_sims:
            save_sims(sims_path(run.dir, args.split), sims, data.image_ids, data.text.caption_ids,
                      {"dataset": dataset, "shard_hashes": data.hashes})
            written.append(str(sims_path(run.dir, args.split)))
        if args.export_index and two_tower:
            from training.export import export_run
            files, summary = export_run(run, args.export_index, batch_size=args.batch_size,
                                        workers=args.workers)
            print(summary)
            written += [str(f) for f in files]
    if warning := small_split_warning(args.split, sims.shape[0]):
        print(f"evaluate: warning: {warning}", file=sys.stderr)

    protocols = args.protocol or (["coco-1k", "coco-5k"] if "coco" in dataset.lower() else ["f30k-1k"])
    results, failed = {}, []
    for protocol in protocols:
        try:
            result, line = protocol_result(sims, protocol, args.fold_size, image_ids=image_ids,
                                           caption_ids=caption_ids)
        except ValueError as e:   # e.g. coco-1k on fewer images than a fold, eccv off COCO 5K
            failed.append((protocol, e))
            continue
        results[f"{args.split}/{protocol}"] = {**result, **tag}
        print(f"{protocol} ({args.split}, {sims.shape[0]} images): {line}")
    if not results:   # nothing to keep: the first reason is the error
        raise failed[0][1]
    for protocol, e in failed:
        skip(protocol, str(e))
    if args.hard_negatives:
        layout = Layout(root, dataset)
        if not layout.hard_negatives.exists():
            skip("--hard-negatives", f"the dataset has no hard-negative pairs ({layout.hard_negatives} "
                 "does not exist)")
        else:
            pairs = shards.read_table(layout.hard_negatives, "hard_negatives").to_pylist()
            hn = hard_negative_accuracy(sims, image_ids, pairs)
            results[f"{args.split}/hard_negatives"] = {**hn, **tag}
            for kind, r in hn.items():
                if isinstance(r, dict):
                    print(f"hard negatives [{kind}] {r['pairs']} pairs: image->text {r['i2t_acc']:.1f}% "
                          f"text->image {r['t2i_acc']:.1f}%")
    old = shards.read_json(out) if out.exists() else {}
    shards.write_json(out, {**old, **results})
    written.append(str(out))
    print(f"evaluate: {what} on {dataset}/{args.split}: {', '.join(results)}"
          f"{'; skipped ' + ', '.join(skipped) if skipped else ''}; wrote {', '.join(written)}")
    return 0


if __name__ == "__main__":   # python training/evaluate.py ...: the same as itmkit evaluate ...
    from itmkit.cli import main as itmkit

    sys.exit(itmkit(["evaluate", *sys.argv[1:]]))
