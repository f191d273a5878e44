"""Time to score N images x 5N captions with a registered model, and its peak memory.

    python benchmarks/eval_speed.py --model vsepp [--images 1000] [--boxes 36] [--batch-size 128]
                                    [--device cpu|cuda] [--words 12]

Synthetic inputs (random region features, random caption word ids with a small random scene
graph) go through the real collate functions and ``training.evaluation.compute_sims``: the
same blocked path evaluate.py takes (one matrix product for two-tower models, similarity on
every image-batch x caption-batch block for cross-attention models). The model is untrained;
speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from pipeline.shards import FEATURE_DIM, Vocabulary
from training import models
from training.data import collate_images, collate_text
from training.evaluation import compute_sims


def synthetic_vocab(n_words: int = 2000) -> Vocabulary:
    words = [[w, 0] for w in ("<pad>", "<start>", "<end>", "<unk>")] + [[f"w{i}", 5] for i in range(n_words)]
    return Vocabulary({"words": words, "min_count": 1, "predicates": [[f"p{i}", 5] for i in range(50)],
                       "attributes": [[f"a{i}", 5] for i in range(100)]})


def batches(items, collate, size):
    return [collate(items[i:i + size]) for i in range(0, len(items), size)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=models.names())
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--words", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128, help="images per block; captions 5x")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--grid", default="7x7", help="grid size for models that need grid features")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    vocab = synthetic_vocab()
    model = models.build(args.model, None, vocab).to(args.device).eval()
    gh, gw = map(int, args.grid.split("x"))
    images = [{"image_id": i, "image_hw": (480, 640), "boxes_known": True,
               "features": rng.random((args.boxes, FEATURE_DIM), dtype=np.float32).astype(np.float16),
               "boxes": np.sort(rng.random((args.boxes, 4), dtype=np.float32), axis=1),
               **({"grid": rng.random((gh * gw, FEATURE_DIM), dtype=np.float32).astype(np.float16),
                   "grid_hw": (gh, gw)} if model.needs_grid else {})}
              for i in range(args.images)]
    n = args.words
    captions = [{"caption_id": j, "image_id": j // 5,
                 "tokens": np.concatenate([[1], rng.integers(4, len(vocab), n), [2]]),
                 "obj_index": np.array([2, n - 1]), "obj_word": rng.integers(4, len(vocab), 2),
                 "attr_object": np.array([0]), "attr_id": rng.integers(1, 100, 1),
                 "attr_word": rng.integers(4, len(vocab), 1), "rel_subject": np.array([0]),
                 "rel_predicate": rng.integers(1, 50, 1), "rel_object": np.array([1])}
                for j in range(5 * args.images)]
    img_batches = batches(images, collate_images, args.batch_size)
    txt_batches = batches(captions, collate_text, 5 * args.batch_size)
    del images, captions

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
    print(f"eval_speed: {args.model} ({kind}) scored {sims.shape[0]} images x {sims.shape[1]} captions "
          f"in {dt:.2f}s on {args.device} ({sims.size / dt:,.0f} pairs/s), {mem}")


if __name__ == "__main__":
    main()
