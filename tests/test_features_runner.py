"""The extraction runner's GPU shape on CPU: batches of one resized size written back in
images.parquet order, results independent of the batch size, one backbone pass per image
recorded in shards.json, and the --profile table."""

import numpy as np
import pytest
from PIL import Image

from features.runner import size_batches
from pipeline import shards
from pipeline.shards import GridShard, Layout, RegionShard
from test_features_extract import extract

pytestmark = pytest.mark.usefixtures("one_thread")
CHEAP = ["--proposals", "3", "--set", "res5_dilation=1"]   # the region head is most of the time


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_size_batches_hold_one_size_and_stay_near_row_order(batch_size):
    rng = np.random.default_rng(batch_size)
    sizes = [tuple(s) for s in rng.choice([(600, 800), (800, 600), (600, 899), (450, 600)], 200,
                                          p=[0.6, 0.25, 0.1, 0.05])]
    sizes[17] = None   # unknown size: a group of its own kind
    rows = np.arange(1000, 1200)
    window = 32 * batch_size
    batches = size_batches(rows, sizes, batch_size, window)
    assert sorted(r for b in batches for r in b) == rows.tolist()
    assert all(1 <= len(b) <= batch_size and len({sizes[r - 1000] for r in b}) == 1 for b in batches)
    # a writer that writes in row order never holds more than about `window` results
    done, written, waiting = set(), 0, []
    for b in batches:
        done.update(b)
        while 1000 + written in done:
            written += 1
        waiting.append(len(done) - written)
    assert max(waiting) <= window + batch_size
    if batch_size > 1:   # with a few common sizes, most images share a full batch
        full = sum(len(b) for b in batches if len(b) == batch_size)
        assert full >= 0.7 * len(rows)
    assert size_batches(rows, sizes, batch_size, window) == batches   # a resumed chunk: same batches


def make_mixed(root, name="mixed"):
    """8 images of three sizes, interleaved: a batch of 4 must be gathered across rows."""
    layout = Layout(root, name)
    (layout.dir / "img").mkdir(parents=True, exist_ok=True)
    sizes = [(80, 120), (120, 80), (80, 120), (96, 96)] * 2
    rows = []
    for i, (h, w) in enumerate(sizes):
        arr = np.full((h, w, 3), 20 + 15 * i, np.uint8)
        arr[10:40, 10 + 3 * i:40 + 3 * i, i % 3] = 250
        path = layout.dir / "img" / f"{i}.png"
        Image.fromarray(arr).save(path)
        rows.append(dict(image_id=100 + i, path=str(path), split="train", width=w, height=h))
    shards.write_table(layout.images, rows, "images")
    return layout


def test_batched_by_size_in_order_one_pass_and_profile(tmp_path, capsys):
    """Batches of 4 images of one size (gathered across rows, decoded by 2 workers) give the
    shards of batch 1 in images.parquet order with the same numbers; every shard records one
    backbone pass for both kinds; --profile says where the time went."""
    one, four = make_mixed(tmp_path / "a"), make_mixed(tmp_path / "b")
    assert extract(one, "--kind", "both", "--batch-size", "1", "--shard-size", "4", *CHEAP)[0] == 0
    capsys.readouterr()
    rc, summary = extract(four, "--kind", "both", "--batch-size", "4", "--workers", "2", "--shard-size", "4",
                          "--profile", *CHEAP)
    assert rc == 0 and "for 8 image(s)" in summary
    for k, ids in ((0, [100, 101, 102, 103]), (1, [104, 105, 106, 107])):
        for layout in (one, four):
            assert RegionShard(layout.regions("train", k)).image_ids.tolist() == ids
            assert GridShard(layout.grid("train", k)).image_ids.tolist() == ids
        a, b = GridShard(one.grid("train", k)), GridShard(four.grid("train", k))
        ra, rb = RegionShard(one.regions("train", k)), RegionShard(four.regions("train", k))
        for i in range(4):
            np.testing.assert_allclose(b.get(i).astype(np.float32), a.get(i).astype(np.float32), rtol=2e-3, atol=2e-3)
            np.testing.assert_allclose(rb.get(i).boxes, ra.get(i).boxes, atol=1e-2)
    for layout in (one, four):
        entries = layout.index.entries("regions") + layout.index.entries("grid")
        assert len(entries) == 4
        assert all(e.extra["backbone"] == {"passes": 1, "kinds": ["grid", "regions"]} for e in entries)
    err = capsys.readouterr().err
    table = err[err.index("where the time went"):]
    for stage in ("decode wait", "backbone", "grid head", "rpn", "box head", "box selection", "writing",
                  "loop wall"):
        assert f"\n{stage} " in table, table


def test_coco_sizes_counts_input_sizes_and_batches(tmp_path, capsys):
    import json

    from benchmarks.coco_sizes import consecutive_batches, main

    assert consecutive_batches(["a", "a", "b", "a", "a", "a", "a", "a"], 4) == 4   # aa | b | aaaa | a
    sizes = [(640, 480), (480, 640)] * 4 + [(640, 427), (1000, 300)]     # two sizes taking turns
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"width": w, "height": h} for w, h in sizes]}))
    assert main([str(tmp_path / "c.json"), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "10 images, 4 distinct input sizes at 600/1000" in out
    assert "640-class (long side 640): 9 images in 3 sizes -> 3 input sizes" in out
    assert "640x480 -> 800x600: 44 %" in out and "480x640 -> 600x800: 44 %" in out
    # as they come every image is a call of its own; grouped: 4 + 4 + 1 + 1
    assert "1.00 images per forward call as they come; 2.50 grouped by size within 128 rows (80 % " in out
