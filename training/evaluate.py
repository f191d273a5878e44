"""Evaluate a run as the image-text matching literature does.

    python training/evaluate.py runs/NAME [--split test] [--protocol f30k-1k|coco-5k|coco-1k|eccv|cxc]
           [--checkpoint best|last] [--save-sims] [--hard-negatives] [--max-images N]
    python training/evaluate.py --ensemble runs/A runs/B [--split test]   # averages saved sims

Results are printed and merged into <run>/eval.json under "<split>/<protocol>".
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from pipeline import shards
from pipeline.config import add_root_argument, resolve_root
from pipeline.shards import Layout, ShardError, Vocabulary
from training import checkpoint, models
from training.checkpoint import CheckpointError
from training.config import RunConfig
from training.data import (CaptionDataset, DataConfig, ImageDataset, ShardData, collate_images,
                           collate_text, make_loader)
from training.evaluation import PROTOCOLS, compute_sims, hard_negative_accuracy, protocol_result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="run folder written by train.py")
    p.add_argument("--split", default="test")
    p.add_argument("--protocol", choices=PROTOCOLS, action="append",
                   help="default: coco-1k and coco-5k for COCO datasets, else f30k-1k; eccv and cxc "
                   "(COCO 5K test with COCO's ids, docs/training.md) on request")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"))
    add_root_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=128, help="images per block (captions: 5x)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--save-sims", action="store_true", help="write <run>/sims-<split>.npz")
    p.add_argument("--ensemble", nargs="+", metavar="RUN", help="average the saved sims of these runs")
    p.add_argument("--hard-negatives", action="store_true",
                   help="pairwise accuracy on the dataset's hard_negatives.parquet pairs")
    p.add_argument("--max-images", type=int, default=None,
                   help="score only the first N images of the split and their captions (quick checks)")
    p.add_argument("--fold-size", type=int, default=1000, help="images per coco-1k fold")
    p.add_argument("--export-index", metavar="DIR", help="two-tower models: also write the image and "
                   "caption embeddings (float16 + ids) to DIR for a vector index (training/export.py)")
    return p


def sims_path(run_dir, split: str) -> Path:
    return Path(run_dir) / f"sims-{split}.npz"


def save_sims(path: Path, sims, image_ids, caption_ids, meta: dict) -> None:
    with shards.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, sims=sims.astype(np.float32), image_ids=image_ids, caption_ids=caption_ids,
                 dataset=meta["dataset"], shard_hashes=str(sorted(meta["shard_hashes"].items())))


def load_sims(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: no saved similarities; run evaluate.py with --save-sims first")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def model_sims(args, root: Path) -> tuple[np.ndarray, ShardData, RunConfig]:
    run_dir = Path(args.run)
    run = RunConfig.load(run_dir)
    layout = Layout(root, run.dataset)
    vocab = Vocabulary.load(layout.vocab)
    if vocab.fingerprint != run.vocab_fingerprint:
        raise CheckpointError(f"{run_dir}: the run was trained with another vocabulary than {layout.vocab}")
    cls = models.get(run.model)
    data = ShardData(root, run.dataset, vocab, DataConfig(split=args.split, max_len=run.max_len,
                                                          grid=cls.needs_grid, max_images=args.max_images),
                     run.shard_hashes)
    ckpt_path = run_dir / f"{args.checkpoint}.pt"
    ckpt = checkpoint.load(ckpt_path)
    checkpoint.check(ckpt, ckpt_path, model=run.model, vocab_fingerprint=vocab.fingerprint,
                     shard_hashes=data.hashes)
    model = models.build(run.model, run.model_cfg(), vocab)
    model.load_state_dict(ckpt["model"])
    model.to(args.device)
    images = make_loader(ImageDataset(data), partial(collate_images, half=True), args.batch_size,
                         workers=args.workers)
    texts = make_loader(CaptionDataset(data), collate_text, args.batch_size * 5, workers=args.workers)
    sims = compute_sims(model, images, texts, args.device)
    return sims, data, run


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    root = resolve_root(args.root)
    written = []
    if args.ensemble:
        saved = [load_sims(sims_path(r, args.split)) for r in args.ensemble]
        for r, s in zip(args.ensemble[1:], saved[1:]):
            if not (np.array_equal(s["image_ids"], saved[0]["image_ids"])
                    and np.array_equal(s["caption_ids"], saved[0]["caption_ids"])):
                raise CheckpointError(f"{r}: saved sims cover other images/captions than {args.ensemble[0]}")
        sims = np.mean([s["sims"] for s in saved], axis=0)
        dataset, image_ids = str(saved[0]["dataset"]), saved[0]["image_ids"]
        caption_ids = saved[0]["caption_ids"]
        out_dir = Path(args.run) if args.run else None
    else:
        if not args.run:
            raise CheckpointError("give a run folder (or --ensemble RUN1 RUN2 ...)")
        if args.export_index:   # first, so that a cross-attention run is refused before scoring
            from training.export import export_run
            files, summary = export_run(args.run, root, args.export_index, split=args.split,
                                        which=args.checkpoint, device=args.device,
                                        batch_size=args.batch_size, workers=args.workers)
            print(summary)
            written += [str(f) for f in files]
        sims, data, run = model_sims(args, root)
        dataset, image_ids, out_dir = run.dataset, data.image_ids, Path(args.run)
        caption_ids = data.text.caption_ids
        if args.save_sims:
            save_sims(sims_path(out_dir, args.split), sims, data.image_ids, data.text.caption_ids,
                      {"dataset": run.dataset, "shard_hashes": data.hashes})
            written.append(str(sims_path(out_dir, args.split)))

    protocols = args.protocol or (["coco-1k", "coco-5k"] if "coco" in dataset.lower() else ["f30k-1k"])
    results = {}
    for protocol in protocols:
        results[f"{args.split}/{protocol}"], line = protocol_result(
            sims, protocol, args.fold_size, image_ids=image_ids, caption_ids=caption_ids)
        print(f"{protocol} ({args.split}, {sims.shape[0]} images): {line}")
    if args.hard_negatives:
        layout = Layout(root, dataset)
        if not layout.hard_negatives.exists():
            raise ShardError(f"{layout.hard_negatives}: the dataset has no hard-negative pairs")
        pairs = shards.read_table(layout.hard_negatives, "hard_negatives").to_pylist()
        hn = hard_negative_accuracy(sims, image_ids, pairs)
        results[f"{args.split}/hard_negatives"] = hn
        for kind, r in hn.items():
            if isinstance(r, dict):
                print(f"hard negatives [{kind}] {r['pairs']} pairs: image->text {r['i2t_acc']:.1f}% "
                      f"text->image {r['t2i_acc']:.1f}%")
    if out_dir is not None:
        path = out_dir / ("eval-ensemble.json" if args.ensemble else "eval.json")
        old = shards.read_json(path) if path.exists() else {}
        shards.write_json(path, {**old, **results})
        written.append(str(path))
    what = f"ensemble of {len(args.ensemble)} runs" if args.ensemble else f"{args.run} ({args.checkpoint}.pt)"
    print(f"evaluate: {what} on {dataset}/{args.split}: {', '.join(results)}; "
          f"wrote {', '.join(written) or 'nothing (no run folder given)'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ShardError, CheckpointError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)
