"""What ingest's image checks cost per image: path resolution (the image-folder rule), header reads
(the bad-image policy) and the search for identical files, against reading and hashing every file.

    python benchmarks/ingest_checks.py [--images 3000] [--copies 30] [--width 256] [--dir /tmp/bench/ingest_checks]

Writes a Flickr30K-layout fixture (Karpathy split file, 5 captions per image) of small JPEGs whose
content is random blocks, so that their byte sizes spread as photos' do, plus ``--copies`` byte
copies of train images placed in the test split. Each stage runs once over all images after one
warm-up pass (page cache hot), then the whole ingest runs once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import manifest as manifests
from pipeline import shards
from pipeline.images import open_image
from pipeline.ingest import identical_files, ingest, resolved


def write_fixture(src: Path, n: int, copies: int, width: int) -> list[Path]:
    rng = np.random.default_rng(0)
    (src / "images").mkdir(parents=True, exist_ok=True)
    entries, paths = [], []
    for i in range(n + copies):
        path = src / "images" / f"{i:06d}.jpg"
        if i < n:
            blocks = rng.integers(0, 256, (rng.integers(3, 13), rng.integers(4, 17), 3), dtype=np.uint8)
            Image.fromarray(blocks).resize((width, width * 3 // 4), Image.NEAREST).save(path, quality=90)
        else:  # a copy of a train image, in test
            shutil.copyfile(paths[i - n], path)
        split = "test" if i >= n or i % 10 == 9 else "val" if i % 10 == 8 else "train"
        entries.append({"filename": path.name, "imgid": i, "split": split,
                        "sentences": [{"raw": f"photo {i} caption {k}", "sentid": 5 * i + k} for k in range(5)]})
        paths.append(path)
    (src / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000, help="distinct images (default: 3000)")
    ap.add_argument("--copies", type=int, default=30, help="byte copies of train images put in test (default: 30)")
    ap.add_argument("--width", type=int, default=256, help="image width; height is 3/4 of it (default: 256)")
    ap.add_argument("--dir", default="/tmp/bench/ingest_checks", help="fixture folder (default: /tmp/bench/ingest_checks)")
    args = ap.parse_args()
    src = Path(args.dir) / "f30k"
    shutil.rmtree(args.dir, ignore_errors=True)
    paths = write_fixture(src, args.images, args.copies, args.width)
    n = len(paths)
    sizes = Counter(p.stat().st_size for p in paths)
    shared = [p for p in paths if sizes[p.stat().st_size] > 1]
    heads = Counter((p.stat().st_size, p.read_bytes()[:4096]) for p in shared)
    whole = [p for p in shared if heads[(p.stat().st_size, p.read_bytes()[:4096])] > 1]
    mib = sum(k * v for k, v in sizes.items()) / 2**20
    read = (sum(min(4096, p.stat().st_size) for p in shared) + sum(p.stat().st_size for p in whole)) / 2**20
    print(f"{n:,} files, {mib:.1f} MiB, mean {mib * 1024 / n:.1f} KiB; {len(shared):,} share a byte size "
          f"with another, {len(whole):,} also their first 4 KiB")
    print(f"bytes read to find identical files: {read:.2f} MiB ({100 * read / mib:.1f} % of hashing every file)")

    def resolve_all(ps):
        folders = {}
        return [resolved(p, folders) for p in ps]

    def headers(ps):
        for p in ps:
            with open_image(p) as im:
                im.size

    stages = {
        "resolve paths (image-folder rule)": resolve_all,
        "  the same with Path.resolve": lambda ps: [p.resolve() for p in ps],
        "read headers (bad-image policy)": headers,
        "identical files: size, first 4 KiB, sha256": identical_files,
        "sha256 of every file (the naive check)": lambda ps: [shards.sha256_file(p) for p in ps],
        "read every file, no hash": lambda ps: [p.read_bytes() for p in ps],
    }
    for fn in stages.values():  # warm-up: page cache and imports
        fn(paths)
    for name, fn in stages.items():
        t = time.perf_counter()
        fn(paths)
        s = time.perf_counter() - t
        print(f"{name:45s} {s:7.3f} s  {1e6 * s / n:7.1f} us/image")
    groups = identical_files(paths)
    print(f"identical groups found: {len(groups)} (expected {args.copies})")

    m = manifests.load("f30k", source_root=str(src), sets=["expected=null"])
    t = time.perf_counter()
    r = ingest(m, Path(args.dir) / "root", force=True, progress=False)
    s = time.perf_counter() - t
    print(f"{'whole ingest (ingest(), no CLI start-up)':45s} {s:7.3f} s  {1e6 * s / n:7.1f} us/image; "
          f"{r.images:,} images, notes {dict(r.notes)}")


if __name__ == "__main__":
    main()
