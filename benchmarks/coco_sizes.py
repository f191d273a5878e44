"""How many network input sizes a COCO-style annotation file gives, and what the extractor's
size-grouped batches make of them.

    python benchmarks/coco_sizes.py captions_val2017.json [--min-size 600] [--max-size 1000]
        [--batch-size 4] [--window 128]

Reads the ``images`` list (width, height, in file order) of any COCO ``captions_*.json`` or
``instances_*.json``, resizes each size as the extractor does (short side ``--min-size``, long side
at most ``--max-size``) and prints: the distinct input sizes of the 640-class (long side 640) and
of all images, the commonest ones with their shares, how many sizes cover 80 % and 90 % of the
images, and the images per forward call at ``--batch-size``: consecutive images of one size as
they come (what batching without grouping gets) against ``size_batches`` of the runner, which
groups equal sizes within a window of rows.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

from features.runner import size_batches
from features.transforms import resized_size
from pipeline.config import HelpFormatter, positive_int


def consecutive_batches(sizes: list, batch_size: int) -> int:
    """Forward calls when a batch holds consecutive images of one size only."""
    calls, run = 0, 0
    for i, size in enumerate(sizes):
        if run == 0 or size != sizes[i - 1] or run == batch_size:
            calls, run = calls + 1, 0
        run += 1
    return calls


def covering(counts: Counter, share: float) -> int:
    total, acc = sum(counts.values()), 0
    for k, (_, n) in enumerate(counts.most_common(), 1):
        acc += n
        if acc >= share * total:
            return k
    return len(counts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("annotations", help="a COCO captions_*.json or instances_*.json")
    ap.add_argument("--min-size", type=positive_int, default=600, help="short side after resize")
    ap.add_argument("--max-size", type=positive_int, default=1000, help="long side limit")
    ap.add_argument("--batch-size", type=positive_int, default=4, help="images per forward call, at most")
    ap.add_argument("--window", type=positive_int, default=128, help="rows a size group may wait")
    args = ap.parse_args(argv)

    with open(args.annotations) as f:
        images = json.load(f)["images"]
    whs = [(im["width"], im["height"]) for im in images]
    inputs = [resized_size(h, w, args.min_size, args.max_size) for w, h in whs]
    cls = [(wh, size) for wh, size in zip(whs, inputs) if max(wh) == 640]
    cls_inputs = Counter(size for _, size in cls)
    originals = Counter(wh for wh, _ in cls)
    print(f"{args.annotations}: {len(images):,} images, {len(set(inputs)):,} distinct input sizes at "
          f"{args.min_size}/{args.max_size}")
    print(f"640-class (long side 640): {len(cls):,} images in {len(originals):,} sizes -> "
          f"{len(cls_inputs):,} input sizes")
    for (w, h), n in originals.most_common(4):
        ih, iw = resized_size(h, w, args.min_size, args.max_size)
        print(f"  {w}x{h} -> {iw}x{ih}: {100 * n / len(cls):.0f} %")
    print(f"  sizes covering 80 %: {covering(cls_inputs, 0.8)}, 90 %: {covering(cls_inputs, 0.9)}")
    plain = consecutive_batches(inputs, args.batch_size)
    grouped = size_batches(list(range(len(inputs))), inputs, args.batch_size, args.window)
    full = sum(len(b) for b in grouped if len(b) == args.batch_size)
    print(f"batch {args.batch_size}, file order: {len(inputs) / plain:.2f} images per forward call as they "
          f"come; {len(inputs) / len(grouped):.2f} grouped by size within {args.window} rows "
          f"({100 * full / len(inputs):.0f} % of the images in full batches)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
