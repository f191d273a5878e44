"""Which feature stream of a context demo build knows the backdrop? Prints the accuracy of a
nearest-centroid probe (cosine, one centroid per backdrop from the train split, scored on the
test split) on each image's mean-pooled region features and mean-pooled grid features.

    python benchmarks/backdrop_probe.py --root data [--dataset demo]

The build must be a ``--scenes context`` demo with both feature kinds extracted; the backdrop of
every image is drawn again from the settings recorded in its images.parquet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import demo, shards  # noqa: E402
from pipeline.shards import Layout  # noqa: E402


def pooled(files: list[Path], kind: str) -> dict[int, np.ndarray]:
    """image id -> its mean feature vector, L2-normalised."""
    out = {}
    for path in files:
        with h5py.File(path, "r") as f:
            ids, feats = f["image_ids"][:], f["features"]
            if kind == "grid":
                means = feats[:].astype(np.float32).mean(1)
            else:
                offsets = f["offsets"][:]
                flat = feats[:].astype(np.float32)
                means = np.stack([flat[a:b].mean(0) for a, b in zip(offsets[:-1], offsets[1:])])
        means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
        out.update(zip(ids.tolist(), means))
    return out


def probe(features: dict[int, np.ndarray], label: dict[int, str], split: dict[int, str]) -> float:
    names = sorted(set(label.values()))
    train = [i for i in features if split[i] == "train"]
    test = [i for i in features if split[i] == "test"]
    centroids = np.stack([np.mean([features[i] for i in train if label[i] == n], 0) for n in names])
    guess = np.argmax(np.stack([features[i] for i in test]) @ centroids.T, axis=1)
    return 100.0 * float(np.mean([names[g] == label[i] for g, i in zip(guess, test)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--dataset", default="demo")
    args = p.parse_args(argv)
    layout = Layout(Path(args.root), args.dataset)
    config = shards.table_metadata(layout.images)["config"]
    if config.get("scenes") != "context":
        raise SystemExit(f"backdrop_probe: {layout.images} is not a --scenes context demo build")
    version = config.pop("context_version", 1)
    if version != demo.CONTEXT_VERSION:
        print(f"note: built by context scenes version {version}, labels drawn by version {demo.CONTEXT_VERSION}")
    scenes, _ = demo.build_scenes(demo.DemoConfig(**config))
    label = {i: s.backdrop for i, (_, s) in enumerate(scenes)}
    split = {i: sp for i, (sp, _) in enumerate(scenes)}
    n = len(set(label.values()))
    counts = {s: sum(v == s for v in split.values()) for s in ("train", "test")}
    print(f"backdrops: {n} (chance {100 / n:.1f} %); {counts['train']} train / {counts['test']} test images")
    for kind in ("regions", "grid"):
        files = sorted((layout.dir / kind).glob(f"{kind}-*.h5"))
        if not files:
            print(f"{kind}: no shards under {layout.dir / kind}")
            continue
        print(f"{kind}: nearest-centroid backdrop accuracy {probe(pooled(files, kind), label, split):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
