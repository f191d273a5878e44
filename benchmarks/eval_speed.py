"""Time to score N images x 5N captions with a registered model, and its peak memory.

    python benchmarks/eval_speed.py --model vsepp [--images 1000] [--boxes 36] [--batch-size 128]
                                    [--device cpu|cuda] [--grid 7x7] [--set KEY=VALUE ...]

Random inputs (``training.synthetic.random_*_batches``: region features and boxes, captions of
8-16 random words with a small scene graph) go through the real collate functions and
``training.evaluation.compute_sims``: the same blocked path evaluate.py takes (one matrix product for two-tower models, similarity on
every image-batch x caption-batch block for cross-attention models). The model is untrained;
speed does not depend on the weights. The model has its default (paper-size) config unless
``--set`` changes it; a key the model does not have is skipped, so one command line serves
several models.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from training import models
from training.config import parse_shared_overrides
from training.evaluation import compute_sims
from training.synthetic import random_caption_batches, random_image_batches, random_vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=models.names())
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--batch-size", type=int, default=128, help="images per block; captions 5x")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", default="7x7", help="grid size for models that need grid features")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override where the model has the field (e.g. embed_dim=256)")
    args = ap.parse_args()

    vocab = random_vocab()
    overrides = parse_shared_overrides(args.set, models.get(args.model).config_class)
    model = models.build(args.model, overrides, vocab).to(args.device).eval()
    gh, gw = map(int, args.grid.split("x"))
    img_batches = random_image_batches(args.images, args.boxes, getattr(model.cfg, "feature_dim", 2048), args.batch_size,
                                       (gh, gw) if model.needs_grid else None)
    txt_batches = random_caption_batches(5 * args.images, vocab, 5 * args.batch_size)

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    sims = compute_sims(model, img_batches, txt_batches, args.device, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        mem = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        mem = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB " \
              f"(+{(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 2**20:.2f} during scoring)"
    dt = time.perf_counter() - t
    kind = "two-tower" if model.two_tower else "cross-attention"
    sets = f" [{' '.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else ""
    print(f"eval_speed: {args.model}{sets} ({kind}) scored {sims.shape[0]} images x "
          f"{sims.shape[1]} captions "
          f"in {dt:.2f}s on {args.device} ({sims.size / dt:,.0f} pairs/s), {mem}")


if __name__ == "__main__":
    main()
