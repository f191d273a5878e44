"""Time of the ECCV Caption and CxC protocols on a COCO 5K test-sized similarity matrix.

    python benchmarks/protocol_speed.py [--repeats 3] [--package]

Random float32 scores for the 5,000 test images x 25,000 test captions of the eccv-caption
package (rows and columns shuffled), then ``training.protocols.eccv`` and ``cxc`` as evaluate.py
calls them (reading the annotation files included). ``--package`` also times the package's own
``Metrics.compute_all_metrics`` on top-50 ranked lists of the same matrix (the input its example
builds), and the building of those lists.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from training import protocols


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each protocol (default: 3)")
    p.add_argument("--package", action="store_true",
                   help="also time the eccv-caption package's own metrics (default: off)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    coco = protocols.load_annotations("coco")
    images, captions = rng.permutation(coco.image_ids), rng.permutation(coco.caption_ids)
    sims = rng.random((len(images), len(captions)), dtype=np.float32)
    print(f"similarity matrix {sims.shape[0]:,} x {sims.shape[1]:,} float32, random scores")
    _, t, _ = timed(lambda: protocols.load_annotations("eccv"), args.repeats)
    print(f"read eccv annotations: {t:.2f} s")
    for name in ("eccv", "cxc"):
        m, best, median = timed(lambda: getattr(protocols, name)(sims, images, captions), args.repeats)
        print(f"{name}: {best:.2f} s (median of {args.repeats}: {median:.2f} s), "
              f"{m['queries']['i2t']:,} image + {m['queries']['t2i']:,} caption queries")
    if args.package:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from eccv_caption import Metrics
        t = time.perf_counter()
        i2t, t2i = protocols.ranked_lists(sims, images, captions, k=50)
        lists = time.perf_counter() - t
        metric = Metrics()
        t = time.perf_counter()
        metric.compute_all_metrics(i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r",
                                                             "eccv_rprecision", "cxc_recalls"))
        print(f"package: top-50 lists {lists:.2f} s, eccv + cxc metrics {time.perf_counter() - t:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
