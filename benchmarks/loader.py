"""Training-loader throughput and memory on a large synthetic dataset.

    python benchmarks/loader.py [--images 20000] [--boxes 36] [--workers 2] [--batch-size 128]
                                [--batches 200] [--dir PATH]

Writes (or reuses, in --dir) a synthetic dataset with the real shard writers (random float16
region features, 5 captions per image with scene graphs), then iterates the training
DataLoader (PairDataset + collate_pairs, shuffled) and prints samples/s and the peak resident
memory of the loader process and its workers. RSS is split into anonymous memory (what the
loader holds) and file-backed pages (memory-mapped shard bytes: page cache the kernel can drop),
summed over the processes (pages shared between workers are counted once per process). Samples
per CPU-second (main process + workers, start-up included) is the figure to compare across
machine loads; samples/s is wall-clock.
"""

from __future__ import annotations

import argparse
from functools import partial
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

from pipeline.shards import Layout, Vocabulary
from training.data import DataConfig, PairDataset, ShardData, collate_pairs, make_loader
from training.synthetic import make_dataset


def rss_kib(pid: int) -> tuple[int, int]:
    """(anonymous, file-backed) resident KiB of a process and its children."""
    anon = file = 0
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        anon = int(fields.get("RssAnon", "0 kB").split()[0]) + int(fields.get("RssShmem", "0 kB").split()[0])
        file = int(fields.get("RssFile", "0 kB").split()[0])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, ValueError):
        return anon, file
    for c in children:
        a, f = rss_kib(int(c))
        anon, file = anon + a, file + f
    return anon, file


class PeakRSS(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, (0, 0, 0), threading.Event()

    def run(self):
        while not self.stop.is_set():
            a, f = rss_kib(self.pid)
            if a + f > self.peak[0]:
                self.peak = (a + f, a, f)
            self.peak = (self.peak[0], max(self.peak[1], a), max(self.peak[2], f))
            time.sleep(self.every)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200, help="batches to time (0 = one epoch)")
    ap.add_argument("--float32", dest="half", action="store_false",
                    help="collate region features to float32 in the workers (default: float16, "
                         "cast by Batch.to as train.py does)")
    ap.add_argument("--dir", default=None, help="keep the dataset here and reuse it on later runs")
    args = ap.parse_args()

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="itmkit-loader-"))
    layout = Layout(folder, "synth")
    t = time.perf_counter()
    if not layout.vocab.exists():
        make_dataset(folder, splits={"train": args.images}, boxes=args.boxes, images_per_shard=5000)
        print(f"wrote {args.images} images x {args.boxes} boxes in {time.perf_counter() - t:.0f}s "
              f"under {folder}")
    t = time.perf_counter()
    data = ShardData(folder, "synth", Vocabulary.load(layout.vocab), DataConfig(split="train"))
    print(f"opened the split ({data.n_images} images, {len(data.text)} captions) in "
          f"{time.perf_counter() - t:.1f}s")
    loader = make_loader(PairDataset(data), partial(collate_pairs, half=args.half), args.batch_size,
                         shuffle=True, workers=args.workers, drop_last=True)
    monitor = PeakRSS(os.getpid())
    monitor.start()
    n_batches = args.batches or len(loader)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first reads) is not timed
    cpu0 = _cpu_seconds(resource.RUSAGE_SELF)
    t, samples = time.perf_counter(), 0
    for k, batch in enumerate(it):
        samples += len(batch)
        if k + 1 >= n_batches:
            break
    dt = time.perf_counter() - t
    cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu0
    monitor.stop.set()
    monitor.join()
    del it, loader  # joins the workers, so their CPU time is counted as children's
    cpu += _cpu_seconds(resource.RUSAGE_CHILDREN)
    total, anon, file = (v / 2**20 for v in monitor.peak)
    print(f"loader: {samples / dt:,.0f} samples/s wall, {samples / cpu:,.0f} samples per CPU-second "
          f"({samples} samples, batch {args.batch_size}, {args.workers} workers, {args.boxes} boxes x "
          f"2048 float16, batches carry {'float16' if args.half else 'float32'}); peak RSS "
          f"{total:.2f} GiB (anonymous {anon:.2f} GiB, file-backed shard pages {file:.2f} GiB), "
          f"load average {os.getloadavg()[0]:.1f}")


def _cpu_seconds(who) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


if __name__ == "__main__":
    main()
