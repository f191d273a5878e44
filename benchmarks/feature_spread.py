"""How far apart a split's images are, in the region features and in a model's embeddings: the
measurement behind vsepp's collapse to equal scores (docs/models.md, "vsepp").

    python benchmarks/feature_spread.py --root data --dataset demo [--split val]
        [--run runs/demo-vsepp [--checkpoint last.pt | --init]]

Features: the mean off-diagonal cosine between the mean-pooled region features of the images,
and the length of their common (mean) vector against the mean length of an image's own part
(its pooled vector minus the common one). With --run: the run's model on the same split, the
mean off-diagonal cosine between image embeddings and between caption embeddings (two-tower
models), and the spread of the scores (std over images per caption, over captions per image);
--init measures the model of the run's config before training (its seed).
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from pipeline.config import add_root_argument, resolve_root
from pipeline.shards import Layout, Vocabulary
from training import checkpoint, models
from training.config import RunConfig
from training.data import (CaptionDataset, DataConfig, ImageDataset, ShardData, collate_images,
                           collate_text, make_loader)
from training.evaluation import compute_sims, encode
from training.models.layers import masked_mean


def off_diagonal_cosine(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    c = x @ x.t()
    return c[~torch.eye(len(c), dtype=torch.bool)].mean().item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_root_argument(ap)
    ap.add_argument("--dataset", default="demo", help="dataset name (default demo)")
    ap.add_argument("--split", default="val", help="split (default val)")
    ap.add_argument("--run", default=None, help="a run folder to measure the model of (default none)")
    ap.add_argument("--checkpoint", default="last.pt", help="checkpoint in --run (default last.pt)")
    ap.add_argument("--init", action="store_true", help="the run's model before training")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = resolve_root(args.root)
    vocab = Vocabulary.load(Layout(root, args.dataset).vocab)
    data = ShardData(root, args.dataset, vocab, DataConfig(split=args.split))
    images = make_loader(ImageDataset(data), partial(collate_images, half=True), 128)
    pooled = torch.cat([masked_mean(b.regions.float(), b.region_mask) for b in images])
    common = pooled.mean(0)
    own = (pooled - common).norm(dim=1).mean().item()
    print(f"{args.dataset}/{args.split}, {len(pooled)} images: mean-pooled region features at cosine "
          f"{off_diagonal_cosine(pooled):.4f}; common vector {common.norm():.1f} long, an image's own "
          f"part {own:.1f} ({common.norm().item() / own:.1f}x)")
    if args.run is None:
        return 0
    run = RunConfig.load(args.run)
    torch.manual_seed(run.seed)
    model = models.build(run.model, run.model_cfg(), vocab)
    if not args.init:
        model.load_state_dict(checkpoint.load(f"{args.run}/{args.checkpoint}")["model"])
    model.eval()
    texts = make_loader(CaptionDataset(data), collate_text, 640)
    which = "initialisation" if args.init else args.checkpoint
    if model.two_tower:
        v, t = torch.cat(encode(model.encode_image, images, "cpu")), torch.cat(encode(model.encode_text, texts, "cpu"))
        print(f"{args.run} ({which}): image embeddings at cosine {off_diagonal_cosine(v):.4f}, "
              f"caption embeddings at cosine {off_diagonal_cosine(t):.4f}")
    sims = torch.from_numpy(compute_sims(model, images, texts, "cpu", progress=False))
    print(f"{args.run} ({which}): scores std {sims.std():.5f}; over images per caption "
          f"{sims.std(0).mean():.5f}, over captions per image {sims.std(1).mean():.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
