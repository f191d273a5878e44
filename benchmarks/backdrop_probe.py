"""Which feature stream of a context demo build knows the backdrop? Prints, for region and grid
features, the test-split accuracy of two probes fitted on the train split: a nearest-centroid
probe (cosine, one centroid per backdrop) on each image's mean-pooled features, and a linear
probe (softmax regression on every region or grid cell, standardised with the train statistics;
an image's guess is the backdrop of the highest summed log-probability of its regions/cells),
which also finds a backdrop that only some regions (e.g. the corners of their boxes) show.

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
import torch

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


def per_item(files: list[Path], kind: str) -> dict[int, np.ndarray]:
    """image id -> its [n, C] region features or grid cells."""
    out = {}
    for path in files:
        with h5py.File(path, "r") as f:
            ids, feats = f["image_ids"][:].tolist(), f["features"][:].astype(np.float32)
            if kind == "grid":
                out.update(zip(ids, feats))
            else:
                offsets = f["offsets"][:]
                out.update((i, feats[a:b]) for i, a, b in zip(ids, offsets[:-1], offsets[1:]))
    return out


def linear_probe(items: dict[int, np.ndarray], label: dict[int, str], split: dict[int, str],
                 steps: int = 300, seed: int = 0) -> float:
    names = sorted(set(label.values()))
    train = [i for i in items if split[i] == "train" and len(items[i])]
    test = [i for i in items if split[i] == "test"]
    x = torch.from_numpy(np.concatenate([items[i] for i in train]))
    y = torch.tensor([names.index(label[i]) for i in train for _ in range(len(items[i]))])
    mean, std = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(layer((x - mean) / std), y).backward()
        opt.step()
    right = 0
    with torch.no_grad():
        for i in test:
            if len(items[i]):
                logp = layer((torch.from_numpy(items[i]) - mean) / std).log_softmax(1).sum(0)
                right += names[int(logp.argmax())] == label[i]
    return 100.0 * right / len(test)


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
        print(f"{kind}: nearest-centroid backdrop accuracy {probe(pooled(files, kind), label, split):.1f} %, "
              f"linear probe {linear_probe(per_item(files, kind), label, split):.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
