"""Random reads of one image's 36x2048 region features: itmkit's region HDF5 shard vs a
memory-mapped float32 .npy (the SCAN / VSE-infinity precomp layout), hot cache, same run.

    python benchmarks/shard_read.py [--images 4000] [--reads 20000] [--sparsity 0.5]

Features are synthetic but shaped like bottom-up-attention features: non-negative means of
ReLU outputs, a fraction ``--sparsity`` of them exactly zero. Lossless compression ratios
depend on that fraction, so the script prints it next to the sizes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.shards import RegionShard, Regions, RegionShardWriter

K, D = 36, 2048


def synthetic_features(rng, n_images, sparsity):
    for _ in range(n_images):
        x = rng.gamma(0.8, 0.6, (K, D)).astype(np.float32)
        x[rng.random((K, D)) < sparsity] = 0.0
        yield x


def write_both(folder: Path, n_images: int, sparsity: float, compressions) -> dict:
    rng = np.random.default_rng(0)
    npy = np.lib.format.open_memmap(folder / "train_ims.npy", "w+", np.float32, (n_images, K, D))
    writers = {c: RegionShardWriter(folder / f"regions-{c}.h5", boxes_per_chunk=K,
                                    compression=None if c == "none" else c)
               for c in compressions}
    for i, x in enumerate(synthetic_features(rng, n_images, sparsity)):
        npy[i] = x
        r = Regions(i, (480, 640), x.astype(np.float16), np.zeros((K, 4), np.float32))
        for w in writers.values():
            w.append(r)
    npy.flush()
    del npy
    return {c: w.close() for c, w in writers.items()}


def time_reads(read, order) -> float:
    t = time.perf_counter()
    for i in order:
        read(int(i))
    return len(order) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--reads", type=int, default=20000)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--compressions", default="none,lzf,gzip")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as inside a DataLoader worker

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        shards = write_both(folder, args.images, args.sparsity, args.compressions.split(","))
        npy_path = folder / "train_ims.npy"
        order = np.random.default_rng(1).integers(0, args.images, args.reads)

        mm = np.load(npy_path, mmap_mode="r")
        # both end as the float32 tensor a DataLoader worker hands to the model
        readers = {"npy mmap float32": lambda i: torch.from_numpy(np.array(mm[i]))}
        for c, path in shards.items():
            shard = RegionShard(path)
            readers[f"h5 float16 {c}"] = (
                lambda s: lambda i: torch.from_numpy(s.get(i, ("features",)).features).float())(shard)

        npy_size = npy_path.stat().st_size
        print(f"{args.images} images x {K}x{D}, {args.reads} random reads, sparsity {args.sparsity}")
        print(f"{'format':24s} {'reads/s':>10s} {'vs mmap':>8s} {'MB on disk':>11s} {'vs npy':>7s}")
        base = None
        for name, read in readers.items():
            for i in range(args.images):  # hot cache: touch everything once
                read(i)
            rate = time_reads(read, order)
            base = base or rate
            size = npy_size if name.startswith("npy") else shards[name.split()[-1]].stat().st_size
            print(f"{name:24s} {rate:10.0f} {rate / base:8.2f} {size / 1e6:11.1f} {size / npy_size:7.3f}")


if __name__ == "__main__":
    main()
