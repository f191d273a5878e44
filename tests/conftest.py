"""Fixtures shared by several test files."""

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.labels import attribute_names, object_names
from pipeline.shards import Layout, Regions, RegionShard, RegionShardWriter


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: with small models and shared cores it is much
    faster than several threads spinning against each other. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(data root, run folder): a 1-epoch vsepp run of embedding size 32 on a synthetic dataset
    of 24 train / 8 val / 8 test images."""
    from training import train
    from training.synthetic import make_dataset
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, splits={"train": 24, "val": 8, "test": 8})
    out = root / "run"
    assert train.main(["--model", "vsepp", "--dataset", "synth", "--root", str(root), "--out", str(out),
                       "--epochs", "1", *TINY]) == 0
    return root, out


RANDOM = "RANDOM (seed 0): features are not meaningful"
EXTRACTOR = {"num_classes": 1600, "num_attributes": 400, "boxes": "given", "min_size": 160}


def label_test_split(root: Path) -> dict[int, list[str]]:
    """Give the synthetic test split what extracted shards have: object and attribute labels and
    scores, the extractor's attributes (RANDOM weights), and image files for the even image ids
    (the odd ones stay missing). Returns the label names written, per image id."""
    layout = Layout(root, "synth")
    index = layout.index
    written = {}
    for entry in index.split_entries("regions", "test"):
        path = layout.dir / entry.path
        images = list(RegionShard(path))
        with RegionShardWriter(path, boxes_per_chunk=6, attrs={"extractor": EXTRACTOR, "weights": RANDOM,
                                                                "weights_sha256": "random-seed-0"}) as w:
            for r in images:
                n = len(r)
                obj = (np.arange(n) * 37 + r.image_id) % 1600
                attr = (np.arange(n) * 11 + r.image_id) % 400
                w.append(Regions(r.image_id, r.image_hw, r.features, r.boxes, obj.astype(np.int32),
                                 np.linspace(0.9, 0.1, n, dtype=np.float32), attr.astype(np.int32),
                                 np.full(n, 0.5, np.float32)))
                written[r.image_id] = [f"{attribute_names()[a]} {object_names()[o]}"
                                       for o, a in zip(obj, attr)]
                if r.image_id % 2 == 0:
                    colour = (30 * (r.image_id % 8), 120, 200)
                    Image.new("RGB", (640, 480), colour).save(layout.dir / f"{r.image_id}.png")
        index.register("regions", path, rows=len(images), config_hash=entry.config_hash)
    return written


@pytest.fixture(scope="module")
def labelled_run(tiny_run):
    """(data root, run folder, label names per test image id): ``tiny_run`` whose test split has
    labelled regions and image files for the even image ids (``label_test_split``)."""
    root, run_dir = tiny_run
    return root, run_dir, label_test_split(root)


FAST = ["--min-size", "64", "--max-size", "96", "--proposals", "8", "--no-progress", "--workers", "0",
        "--threads", "1", "--boxes", "fixed:4", "--set", "depth=50", "--set", "num_classes=20",
        "--set", "bbox_reg_classes=21", "--set", "num_attributes=10", "--set", "pooler_resolution=7",
        "--set", "res5_dilation=1"]


@pytest.fixture(scope="module")
def extracted_run(tmp_path_factory):
    """A synthetic dataset's captions and graphs with region and grid features extracted (random
    weights, seed 3, a small network) from drawn image files, and a 1-epoch vsepp run on it."""
    from itmkit.cli import main as features_main
    from training import train
    from training.synthetic import make_dataset
    root = tmp_path_factory.mktemp("extracted")
    layout = make_dataset(root, "toy", splits={"train": 6, "val": 2, "test": 3})
    rows = shards.read_table(layout.images).to_pylist()
    for r in rows:
        i = r["image_id"]
        arr = np.full((60 + 3 * i, 90 - 2 * i, 3), 20 * i % 255, np.uint8)
        arr[10:40, 5 + 2 * i:45 + 2 * i, i % 3] = 250
        path = layout.dir / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(arr).save(path)
        r.update(path=str(path), height=arr.shape[0], width=arr.shape[1])
    shards.write_table(layout.images, rows, "images")
    layout.index.unregister("regions")    # the generator's; the extractor writes its own
    with contextlib.redirect_stdout(io.StringIO()):
        assert features_main(["extract", "--dataset", "toy", "--root", str(root), "--kind", "both",
                              "--weights", "random", "--seed", "3", *FAST]) == 0
        assert train.main(["--model", "vsepp", "--dataset", "toy", "--root", str(root), "--out",
                           str(root / "run"), "--epochs", "1", "--set", "embed_dim=16", "--set",
                           "word_dim=8", "--batch-size", "10", "--workers", "0"]) == 0
    return root, root / "run", rows
