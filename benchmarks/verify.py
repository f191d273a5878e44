"""What the trainer's check of every shard against shards.json costs, against one epoch.

    python benchmarks/verify.py [--images 20000] [--boxes 36] [--dir PATH] [--train-batches 20]

Writes (or reuses, in --dir) the synthetic split of benchmarks/loader.py (20,000 images x 36
boxes x 2048 float16 region features, 100,000 captions with graphs), then prints:

- the sha256 check ShardData makes of every file a split reads, as ``ShardData`` pays it (build
  time with the check minus build time without it), from the page cache and, when this process
  may drop the cache (root, not in a container), cold;
- one data-only epoch: the training DataLoader over every pair, no model (the least any epoch
  costs);
- vsepp's training step rate on these batches (``--train-batches`` steps, CPU), and the epoch it
  implies;
- the check as a fraction of each epoch.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from pipeline.shards import Layout, Vocabulary
from training import models
from training.data import DataConfig, PairDataset, ShardData, collate_pairs, make_loader
from training.synthetic import make_dataset


def build_seconds(folder, vocab, verify: bool) -> float:
    t = time.perf_counter()
    ShardData(folder, "synth", vocab, DataConfig(split="train", verify=verify))
    return time.perf_counter() - t


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000, help="train images (default 20000)")
    ap.add_argument("--boxes", type=int, default=36, help="boxes per image (default 36)")
    ap.add_argument("--dir", default=None, help="keep the dataset here and reuse it (default: a temporary folder)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--train-batches", type=int, default=20, help="vsepp steps timed (default 20)")
    args = ap.parse_args()

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="itmkit-verify-"))
    layout = Layout(folder, "synth")
    if not layout.vocab.exists():
        t = time.perf_counter()
        make_dataset(folder, splits={"train": args.images}, boxes=args.boxes, images_per_shard=5000)
        print(f"wrote {args.images} images x {args.boxes} boxes in {time.perf_counter() - t:.0f}s under {folder}")
    vocab = Vocabulary.load(layout.vocab)
    entries = layout.index.entries()
    size = sum(e.size for e in entries)
    print(f"dataset: {len(entries)} registered files, {size / 2**30:.2f} GiB, load average {os.getloadavg()[0]:.1f}")

    build_seconds(folder, vocab, verify=True)  # warm the page cache and the caption encoding
    plain = min(build_seconds(folder, vocab, verify=False) for _ in range(2))
    warm = min(build_seconds(folder, vocab, verify=True) for _ in range(2)) - plain
    print(f"check (page cache warm): {warm:.1f}s for {size / 2**30:.2f} GiB "
          f"({size / 2**20 / max(warm, 1e-9):,.0f} MiB/s); ShardData without it {plain:.1f}s")
    cold = None
    if drop_page_cache():
        cold = build_seconds(folder, vocab, verify=True)
        drop_page_cache()
        cold -= build_seconds(folder, vocab, verify=False)
        print(f"check (page cache dropped): about {cold:.1f}s")
    else:
        print("check (page cache dropped): not measured (this process may not drop the page cache)")

    data = ShardData(folder, "synth", vocab, DataConfig(split="train", verify=False))
    loader = make_loader(PairDataset(data), partial(collate_pairs, half=True), 128, shuffle=True,
                         workers=args.workers, drop_last=True)
    t, samples = time.perf_counter(), 0
    for batch in loader:
        samples += len(batch)
    epoch_data = time.perf_counter() - t
    print(f"data-only epoch: {samples:,} pairs in {epoch_data:.1f}s ({samples / epoch_data:,.0f} pairs/s, "
          f"batch 128, {args.workers} workers), load average {os.getloadavg()[0]:.1f}")

    torch.manual_seed(0)
    cfg = models.default_config("vsepp", "f30k")
    model = models.build("vsepp", cfg, vocab)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps, n, t = iter(loader), 0, None
    for k in range(args.train_batches + 1):
        batch = next(steps).to("cpu")
        if k == 1:
            t = time.perf_counter()   # the first step (allocations, worker start) is not timed
        out = model(batch, 0)
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(batch) if k >= 1 else 0
    rate = n / (time.perf_counter() - t)
    epoch_train = samples / rate
    print(f"vsepp training: {rate:,.0f} pairs/s on the CPU ({args.train_batches} steps of 128), so one "
          f"epoch of {samples:,} pairs takes about {epoch_train:,.0f}s, load average {os.getloadavg()[0]:.1f}")
    for name, secs in (("warm", warm), ("cold", cold)):
        if secs is not None:
            print(f"check ({name}) / data-only epoch = {secs / epoch_data:.1%}; "
                  f"check ({name}) / vsepp epoch on the CPU = {secs / epoch_train:.2%}")


if __name__ == "__main__":
    main()
