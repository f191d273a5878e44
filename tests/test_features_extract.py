"""The extraction runner end to end on tiny images: shard contents and order, shards.json,
cache reuse, resume after a kill, config changes, given/fixed boxes, and the bad-image policy."""

import contextlib
import io
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmkit.cli import build_parser
from itmkit.cli import main as features_main
from features.extract import config_from_args
from features.rcnn import BottomUpRCNN
from features.transforms import BadImage, load_image
from features.weights import load_weights, save_detectron2_pickle
from pipeline import shards
from pipeline.shards import GridShard, Layout, RegionShard

# tiny images, few proposals, and a smaller network (ResNet-50 C4, 20 classes) keep the runner
# tests fast; the full-size network is covered by test_features_model.py
FAST = ["--weights", "random", "--min-size", "64", "--max-size", "96", "--proposals", "8", "--no-progress",
        "--workers", "0", "--threads", "1",
        "--set", "depth=50", "--set", "num_classes=20", "--set", "bbox_reg_classes=21",
        "--set", "num_attributes=10"]
ROOT = Path(__file__).resolve().parents[1]


def make_dataset(root, splits=("train",) * 3 + ("test",) * 2, name="toy"):
    layout = Layout(root, name)
    (layout.dir / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, split in enumerate(splits):
        h, w = 70 + 6 * i, 110 - 4 * i
        arr = np.full((h, w, 3), 30, np.uint8)
        arr[10:50, 10 + 5 * i:50 + 5 * i, i % 3] = 250
        path = layout.dir / "img" / f"{i}.jpg"
        Image.fromarray(arr).save(path, quality=95)
        rows.append(dict(image_id=500 - i, path=str(path), split=split, width=w, height=h))
    shards.write_table(layout.images, rows, "images")
    return layout, rows


def extract(layout, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = features_main(["extract", "--dataset", layout.name, "--root", str(layout.root), *FAST, *args])
    return rc, out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else ""


def test_extract_writes_registers_and_reuses(tmp_path):
    layout, rows = make_dataset(tmp_path)
    rc, summary = extract(layout, "--kind", "both", "--shard-size", "2", "--batch-size", "2")
    assert rc == 0 and "wrote 3 regions + 3 grid shard(s) for 5 image(s)" in summary
    by_id = {r["image_id"]: r for r in rows}
    want = {("train", 0): [500, 499], ("train", 1): [498], ("test", 0): [497, 496]}
    index = layout.index
    cfg_hashes = set()
    for (split, k), ids in want.items():
        reg = RegionShard(layout.regions(split, k))
        assert reg.image_ids.tolist() == ids  # images.parquet order within the split
        assert reg.attrs["weights"].startswith("RANDOM (seed 0)")
        assert reg.attrs["extractor"]["min_size"] == 64 and reg.attrs["split"] == split
        cfg_hashes.add(reg.attrs["config_hash"])
        for i, image_id in enumerate(ids):
            r = reg.get(i)
            h, w = by_id[image_id]["height"], by_id[image_id]["width"]
            assert r.image_hw == (h, w)
            assert r.features.dtype == np.float16 and r.features.shape == (len(r), 2048) and len(r) >= 1
            assert np.isfinite(r.features).all() and r.features.astype(np.float32).std() > 0
            assert (r.boxes[:, :2] >= 0).all() and (r.boxes[:, 2] <= w).all() and (r.boxes[:, 3] <= h).all()
            assert (r.obj_labels >= 0).all() and (r.obj_labels < 20).all() and (r.attr_scores > 0).all()
        grid = GridShard(layout.grid(split, k))
        assert grid.image_ids.tolist() == ids and grid.grid_hw == (7, 7)
        assert grid.get(0).shape == (49, 2048) and grid.get(0).dtype == np.float16
        assert grid.attrs["config_hash"] != reg.attrs["config_hash"]  # each kind hashes its own settings
        for kind, shard in (("regions", reg), ("grid", grid)):
            e = index.entry(kind, shard.path)
            assert e.rows == len(ids) and e.config_hash == shard.attrs["config_hash"] and e.inputs_hash
    assert len(cfg_hashes) == 1 and index.verify() == []
    assert len(index.files("regions", cfg_hashes.pop())) == 3
    before = {p: p.stat().st_mtime_ns for p in layout.dir.rglob("*.h5")}
    rc, summary = extract(layout, "--kind", "both", "--shard-size", "2")
    assert rc == 0 and "wrote 0 regions + 0 grid shard(s) for 0 image(s)" in summary and "reused 6" in summary
    assert summary.rstrip().endswith(f" -> {layout.dir.resolve() / 'regions'}, {layout.dir.resolve() / 'grid'}")
    assert before == {p: p.stat().st_mtime_ns for p in layout.dir.rglob("*.h5")}
    # a new box rule touches region shards only: the grid shards stay current
    grid_before = {p: p.stat().st_mtime_ns for p in (layout.dir / "grid").glob("*.h5")}
    rc, summary = extract(layout, "--kind", "both", "--shard-size", "2", "--boxes", "fixed:4")
    assert "wrote 3 regions + 0 grid" in summary and "reused 3" in summary
    assert grid_before == {p: p.stat().st_mtime_ns for p in (layout.dir / "grid").glob("*.h5")}
    reg = RegionShard(layout.regions("train", 0))
    assert reg.box_counts().tolist() == [4, 4] and reg.file["features"].chunks[0] == 4
    # shards.json: how many backbone passes wrote each shard, and which kinds each pass wrote
    assert {e.extra["backbone"]["kinds"] == ["regions"] and e.extra["backbone"]["passes"] == 1
            for e in index.entries("regions")} == {True}
    assert {e.extra["backbone"]["kinds"] == ["grid", "regions"] for e in index.entries("grid")} == {True}


def test_config_change_replaces_old_shards_never_mixes(tmp_path, capsys):
    layout, _ = make_dataset(tmp_path)
    extract(layout, "--kind", "grid", "--shard-size", "2")
    old = {e.path: e.config_hash for e in layout.index.entries("grid")}
    assert len(old) == 3
    rc, summary = extract(layout, "--kind", "grid", "--shard-size", "2", "--grid", "3", "3", "--split", "train",
                          "--chunk", "0")
    assert "written with another config" in capsys.readouterr().err
    entries = {e.path: e.config_hash for e in layout.index.entries("grid")}
    new_hash = entries["grid/grid-train-0000.h5"]
    assert new_hash not in old.values() and GridShard(layout.grid("train", 0)).grid_hw == (3, 3)
    with pytest.raises(shards.ShardError, match="another config"):
        layout.index.files("grid", new_hash)  # the other chunks are still old: refused, not mixed
    # a whole run with a new shard size replaces everything and removes chunks outside the new plan
    rc, summary = extract(layout, "--kind", "grid", "--shard-size", "5", "--grid", "3", "3")
    assert rc == 0 and "removed 1 leftover" in summary
    assert sorted(e.path for e in layout.index.entries("grid")) == ["grid/grid-test-0000.h5", "grid/grid-train-0000.h5"]
    assert not layout.grid("train", 1).exists()
    assert len(layout.index.files("grid", new_hash)) == 2


def test_split_and_chunk_restrict_the_run(tmp_path, capsys):
    layout, _ = make_dataset(tmp_path)
    rc, summary = extract(layout, "--kind", "grid", "--shard-size", "2", "--split", "train", "--chunk", "1")
    assert rc == 0 and [e.path for e in layout.index.entries("grid")] == ["grid/grid-train-0001.h5"]
    assert layout.index.entries("grid")[0].extra["backbone"] == {"passes": 1, "kinds": ["grid"]}
    for bad, message in ((["--split", "train", "--chunk", "7"], "--chunk 7: no such chunk at --shard-size 2"),
                         (["--split", "dev"], "--split dev: no images of that split in images.parquet")):
        with pytest.raises(SystemExit) as e:
            extract(layout, "--kind", "grid", "--shard-size", "2", *bad)
        assert e.value.code == 2 and message in capsys.readouterr().err         # a usage error


def test_given_boxes(tmp_path):
    layout, rows = make_dataset(tmp_path, splits=("val",) * 3)
    boxes = {500: [1.5, 2.0, 40.0, 30.25, 0, 0, 110, 70], 499: [10, 10, 20, 20], 498: []}
    shards.write_table(layout.boxes, [dict(image_id=k, boxes=v, labels=["x"] * (len(v) // 4))
                                      for k, v in boxes.items()], "boxes")
    rc, summary = extract(layout, "--kind", "regions", "--boxes", "given")
    assert rc == 0, summary
    reg = RegionShard(layout.regions("val", 0))
    for i, (image_id, flat) in enumerate(boxes.items()):
        r = reg.get(i)
        assert r.image_id == image_id
        np.testing.assert_array_equal(r.boxes, np.asarray(flat, np.float32).reshape(-1, 4))
        assert r.features.shape == (len(flat) // 4, 2048)
    shards.write_table(layout.boxes, [dict(image_id=500, boxes=[5, 5, 4, 9], labels=["x"])], "boxes")
    rc, summary = extract(layout, "--kind", "regions", "--boxes", "given")
    assert rc == 1  # the error names the file, the row and the image


def test_given_boxes_error_names_the_row(tmp_path, capsys):
    layout, _ = make_dataset(tmp_path, splits=("val",))
    shards.write_table(layout.boxes, [dict(image_id=500, boxes=[5, 5, 4, 9, 1], labels=["x"])], "boxes")
    assert extract(layout, "--boxes", "given")[0] == 1
    err = capsys.readouterr().err
    assert "boxes.parquet: row 0 (image 500)" in err and "multiple of 4" in err


def test_missing_images_table(tmp_path, capsys):
    assert features_main(["extract", "--dataset", "nothing", "--root", str(tmp_path), "--weights", "random"]) == 1
    assert "images.parquet not found" in capsys.readouterr().err


def _feature_arrays(layout):
    out = {}
    for p in sorted(layout.dir.rglob("*.h5")):
        shard = RegionShard(p)
        out[p.name] = (shard.read("image_ids").tobytes(), shard.read("features").tobytes(), shard.read("boxes").tobytes())
    return out


def test_resume_after_kill_is_byte_identical(tmp_path):
    splits = ("train",) * 8
    killed, _ = make_dataset(tmp_path / "a", splits)
    clean, _ = make_dataset(tmp_path / "b", splits)
    cmd = [sys.executable, "-m", "itmkit", "extract", "--dataset", "toy", "--root", str(killed.root),
           "--kind", "regions", "--shard-size", "2", *FAST]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if killed.index.path.exists() and killed.index.entries("regions"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    finished = len(killed.index.entries("regions"))
    assert 1 <= finished < 4, "the run should have been killed in the middle"
    rc, summary = extract(killed, "--kind", "regions", "--shard-size", "2")
    assert rc == 0 and f"wrote {4 - finished} regions" in summary and f"reused {finished}" in summary
    assert not list(killed.dir.rglob("*.tmp"))
    extract(clean, "--kind", "regions", "--shard-size", "2")
    assert _feature_arrays(killed) == _feature_arrays(clean)


def _png_with_size(path, width, height):
    """A valid small PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_max_pixels_decides_what_is_too_large(tmp_path):
    from pipeline.images import MAX_PIXELS, BadImage, open_image

    _png_with_size(tmp_path / "big.png", 10_000, 9_500)       # over Pillow's own warning level
    with open_image(tmp_path / "big.png") as im:               # opened lazily: nothing decoded
        assert im.size == (10_000, 9_500)
    _png_with_size(tmp_path / "bigger.png", 10_001, 10_000)
    with pytest.raises(BadImage, match=f"10001x10000 is over {MAX_PIXELS:,} pixels"):
        open_image(tmp_path / "bigger.png")
    with pytest.raises(BadImage, match="too large"):
        open_image(tmp_path / "big.png", max_pixels=90_000_000)


def make_bad_images(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    base = np.zeros((60, 80, 3), np.uint8)
    base[10:40, 10:50] = (200, 30, 90)
    Image.fromarray(base).save(d / "good.jpg")
    full = (d / "good.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    Image.fromarray(base).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(base).convert("L").save(d / "gray.png")
    rgba = Image.fromarray(base).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    _png_with_size(d / "bomb.png", 30000, 30000)
    (d / "notes.jpg").write_text("this is not an image\n")
    return {"good": "ok", "truncated": "skipped", "cmyk": "converted", "gray": "converted",
            "alpha": "converted", "one": "skipped", "bomb": "skipped", "notes": "skipped", "missing": "skipped"}


def test_load_image_policy(tmp_path):
    expected = make_bad_images(tmp_path)
    files = {p.stem: p for p in tmp_path.iterdir()}
    im, note = load_image(files["good"])
    assert im.mode == "RGB" and note == ""
    for name in ("cmyk", "gray", "alpha"):
        im, note = load_image(files[name])
        assert im.mode == "RGB" and im.size == (80, 60) and note.startswith("converted from")
    # half-transparent black over white
    assert np.asarray(load_image(files["alpha"])[0])[50, 70].tolist() == [127, 127, 127]
    reasons = {"truncated": "truncated or corrupt", "one": "too small", "bomb": "too large",
               "notes": "not an image", "missing": "file not found"}
    for name, reason in reasons.items():
        with pytest.raises(BadImage, match=reason):
            load_image(files.get(name, tmp_path / "missing.jpg"))
    assert sum(v == "skipped" for v in expected.values()) == len(reasons)


def test_bad_images_are_converted_or_skipped_and_reported(tmp_path):
    layout = Layout(tmp_path, "bad")
    expected = make_bad_images(layout.dir / "img")
    rows = [dict(image_id=i, path=str(layout.dir / "img" / (name + (".png" if name in ("gray", "alpha", "one", "bomb") else ".jpg"))),
                 split="train", width=80, height=60) for i, name in enumerate(expected)]
    shards.write_table(layout.images, rows, "images")
    rc, summary = extract(layout, "--kind", "grid", "--batch-size", "3")
    assert rc == 0 and "5 bad image(s) skipped, 3 converted" in summary
    reports = list((layout.dir / "grid").glob("bad-images-*.tsv"))
    assert len(reports) == 1
    lines = [l.split("\t") for l in reports[0].read_text().splitlines()[1:]]
    got = {int(l[0]): (l[3], l[4]) for l in lines}
    for i, (name, action) in enumerate(expected.items()):
        if action == "ok":
            assert i not in got
        else:
            assert got[i][0] == action, (name, got[i])
    kept = [i for i, a in enumerate(expected.values()) if a != "skipped"]
    assert GridShard(layout.grid("train", 0)).image_ids.tolist() == kept
    e = layout.index.entry("grid", layout.grid("train", 0))
    assert e.extra["skipped_images"] == [i for i, a in enumerate(expected.values()) if a == "skipped"]


def test_weights_file_through_the_cli(tmp_path, capsys):
    layout, _ = make_dataset(tmp_path, splits=("val",) * 2)
    args = build_parser().parse_args(["extract", "--dataset", "toy", *FAST])
    model = BottomUpRCNN(config_from_args(args))
    load_weights(model, "random", seed=9)
    weights = save_detectron2_pickle(model, tmp_path / "model_final.pkl")
    rc, summary = extract(layout, "--kind", "regions", "--weights", str(weights))
    assert rc == 0 and "weights model_final.pkl" in summary
    attrs = RegionShard(layout.regions("val", 0)).attrs
    assert attrs["weights_sha256"] == shards.sha256_file(weights) and "RANDOM" not in attrs["weights"]
    # a checkpoint of another shape is refused with the names of what does not fit
    rc, _ = extract(layout, "--kind", "regions", "--weights", str(weights), "--set", "num_attributes=12")
    assert rc == 1 and "attr_score.weight: checkpoint (11, 512) != model (13, 512)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:   # a usage error, as argparse's own
        extract(layout, "--set", "no_such_setting=1")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has no setting 'no_such_setting'" in err and "pooler" in err   # the keys
