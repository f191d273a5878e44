"""import-precomp on a fake SCAN precomp folder of 10 images."""

from pathlib import Path

import numpy as np
import pytest

from pipeline import precomp, shards
from itmkit.cli import main as cli
from pipeline.ingest import IngestError
from pipeline.precomp import PrecompConfig, import_precomp
from pipeline.shards import Layout, RegionShard

DIM = 2048


def make_precomp(folder: Path, splits=(("train", 6), ("dev", 2), ("test", 2)), seed=0, boxes=36):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feats = {}
    for name, n in splits:
        x = rng.random((n, boxes, DIM), dtype=np.float32) * 4
        np.save(folder / f"{name}_ims.npy", x)
        lines = [f"{name} image {i} caption {j}" for i in range(n) for j in range(5)]
        (folder / f"{name}_caps.txt").write_text("\n".join(lines) + "\n")
        feats[name] = x
    return feats


def region_rows(layout, split):
    out = []
    for e in sorted(layout.index.entries("regions"), key=lambda e: e.path):
        if f"regions-{split}-" in e.path:
            out += list(RegionShard(layout.dir / e.path))
    return out


def test_import_writes_shards_tables_and_index(tmp_path, capsys):
    feats = make_precomp(tmp_path / "pc")
    root = tmp_path / "data"
    assert cli(["import-precomp", "--dir", str(tmp_path / "pc"), "--name", "f30k", "--root", str(root),
                "--images-per-shard", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "4 region shard(s) written, 0 reused" in out
    assert "6 train / 2 val / 2 test images, 50 captions" in out
    layout = Layout(root, "f30k")
    images = shards.read_table(layout.images, "images").to_pylist()
    assert [r["split"] for r in images] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    assert {(r["path"], r["width"], r["height"]) for r in images} == {("", 0, 0)}
    caps = shards.read_table(layout.captions, "captions").to_pylist()
    assert len(caps) == 50 and len({c["caption_id"] for c in caps}) == 50
    by_image = {}
    for c in caps:
        by_image.setdefault(c["image_id"], []).append(c)
    assert all(len(v) == 5 for v in by_image.values())
    assert by_image[7][0]["text"] == "dev image 1 caption 0" and by_image[7][0]["split"] == "val"
    for split, scan in (("train", "train"), ("val", "dev"), ("test", "test")):
        regions = region_rows(layout, split)
        ids = [r["image_id"] for r in images if r["split"] == split]
        assert [r.image_id for r in regions] == ids
        for r, x in zip(regions, feats[scan]):
            assert r.features.dtype == np.float16 and r.features.shape == (36, DIM)
            np.testing.assert_allclose(r.features.astype(np.float32), x, rtol=1e-3, atol=1e-3)
            assert np.isnan(r.boxes).all() and (r.obj_labels == -1).all() and (r.attr_labels == -1).all()
            assert r.image_hw == (0, 0)
    assert [Path(e.path).name for e in layout.index.entries("regions")] == [
        "regions-test-0000.h5", "regions-train-0000.h5", "regions-train-0001.h5", "regions-val-0000.h5"]
    assert [e.rows for e in sorted(layout.index.entries("regions"), key=lambda e: e.path)] == [2, 4, 2, 2]
    assert layout.index.verify() == []


def test_rerun_reuses_and_config_change_replaces(tmp_path):
    make_precomp(tmp_path / "pc")
    root = tmp_path / "data"
    r = import_precomp(tmp_path / "pc", "x", root, PrecompConfig(images_per_shard=2), progress=False)
    assert len(r.written) == 5 and not r.reused
    r = import_precomp(tmp_path / "pc", "x", root, PrecompConfig(images_per_shard=2), progress=False)
    assert not r.written and len(r.reused) == 5
    # an interrupted run: a lost shard is redone, the others are reused
    layout = Layout(root, "x")
    layout.regions("train", 1).unlink()
    r = import_precomp(tmp_path / "pc", "x", root, PrecompConfig(images_per_shard=2), progress=False)
    assert r.written == [layout.regions("train", 1)] and len(r.reused) == 4
    # another shard size: everything rewritten, the old extra shards removed, nothing mixed
    r = import_precomp(tmp_path / "pc", "x", root, PrecompConfig(images_per_shard=5), progress=False)
    assert len(r.written) == 4 and sorted(r.removed) == ["regions/regions-train-0002.h5"]
    entries = layout.index.entries("regions")
    assert len({e.config_hash for e in entries}) == 1 and len(entries) == 4
    assert not layout.regions("train", 2).exists()
    assert layout.index.verify() == []


def test_testall_replaces_test_and_bad_captions_are_skipped(tmp_path):
    pc = tmp_path / "pc"
    make_precomp(pc, splits=(("train", 3), ("dev", 2), ("test", 1), ("testall", 2)))
    lines = (pc / "train_caps.txt").read_bytes().split(b"\n")
    lines[0] = b"   "                         # whitespace-only
    lines[1] = b"caf\xe9 au lait"              # latin-1, not UTF-8
    lines[7] = b" ".join([b"w"] * 10_000)     # 10,000 tokens
    (pc / "train_caps.txt").write_bytes(b"\n".join(lines))
    r = import_precomp(pc, "coco", tmp_path / "data", PrecompConfig(min_captions=4), progress=False)
    assert r.split_counts == {"train": 2, "val": 2, "test": 2}
    assert any("testall" in n for n in r.notes)
    msgs = [m for _, m in r.report.problems]
    assert "train_caps.txt line 1: caption is empty or whitespace-only" in msgs
    assert "train_caps.txt line 2: caption is not valid UTF-8" in msgs
    assert "train_caps.txt line 8: caption has 10,000 tokens (max_tokens 200)" in msgs
    assert "train_ims.npy row 0: image has 3 valid caption(s), min_captions is 4" in msgs
    layout = Layout(tmp_path / "data", "coco")
    assert len(region_rows(layout, "train")) == 2
    caps = shards.read_table(layout.captions, "captions").to_pylist()
    assert len(caps) == 4 + 5 + 5 * 2 + 5 * 2
    with pytest.raises(IngestError, match="train_caps.txt line 1: caption is empty"):
        import_precomp(pc, "strict", tmp_path / "data", strict=True, progress=False)
    assert not Layout(tmp_path / "data", "strict").dir.exists()


def test_bad_precomp_folders_fail_with_the_file_named(tmp_path):
    with pytest.raises(IngestError, match="precomp folder not found"):
        import_precomp(tmp_path / "nothing", "x", tmp_path / "d", progress=False)
    pc = tmp_path / "pc"
    make_precomp(pc, splits=(("train", 2),))
    (pc / "train_caps.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(IngestError, match=r"train_caps.txt: 3 lines is not a whole number"):
        import_precomp(pc, "x", tmp_path / "d", progress=False)
    (pc / "train_caps.txt").unlink()
    with pytest.raises(IngestError, match="train_caps.txt: missing"):
        import_precomp(pc, "x", tmp_path / "d", progress=False)
    np.save(pc / "train_ims.npy", np.zeros((2, 2048), np.float32))
    (pc / "train_caps.txt").write_text("c\n" * 10)
    with pytest.raises(IngestError, match=r"expected features of shape \[images, boxes, dim\], got \(2, 2048\)"):
        import_precomp(pc, "x", tmp_path / "d", progress=False)
    (pc / "train_ims.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(IngestError, match="train_ims.npy: cannot read as .npy"):
        import_precomp(pc, "x", tmp_path / "d", progress=False)
    x = np.ones((2, 36, 2048), np.float32)
    x[1, 3, 5] = np.nan
    np.save(pc / "train_ims.npy", x)
    with pytest.raises(IngestError, match="train_ims.npy: row 1 holds NaN"):
        import_precomp(pc, "x", tmp_path / "d", progress=False)
    assert not list((tmp_path / "d").rglob("*.h5")) and not list((tmp_path / "d").rglob("*.tmp"))
    x[1, 3, 5] = 1e6  # beyond float16: clipped and counted
    np.save(pc / "train_ims.npy", x)
    r = import_precomp(pc, "x", tmp_path / "d", progress=False)
    assert r.clipped == 1
    f = region_rows(Layout(tmp_path / "d", "x"), "train")[1].features
    assert f[3, 5] == np.float16(65504) and np.isfinite(f).all()


def test_features_are_streamed_from_a_memory_map(tmp_path, monkeypatch):
    make_precomp(tmp_path / "pc", splits=(("train", 10),))
    calls = []
    real_load = np.load

    def spy(path, *args, **kwargs):
        calls.append(kwargs.get("mmap_mode"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(precomp.np, "load", spy)
    reads = []
    real_array = np.array

    def spy_array(a, *args, **kwargs):
        if isinstance(a, np.memmap):
            reads.append(len(a))
        return real_array(a, *args, **kwargs)

    monkeypatch.setattr(precomp.np, "array", spy_array)
    import_precomp(tmp_path / "pc", "x", tmp_path / "d", PrecompConfig(block=3), progress=False)
    assert calls and set(calls) == {"r"}
    assert reads == [3, 3, 3, 1]  # block by block, never the whole array


def test_captions_file_with_a_byte_order_mark_is_read(tmp_path):
    """A caps.txt saved by a spreadsheet program or editor starts with a UTF-8 byte-order mark:
    it is not part of the first caption."""
    make_precomp(tmp_path / "pc")
    caps = tmp_path / "pc" / "train_caps.txt"
    caps.write_bytes(b"\xef\xbb\xbf" + caps.read_bytes())
    root = tmp_path / "data"
    assert cli(["import-precomp", "--dir", str(tmp_path / "pc"), "--name", "f30k", "--root", str(root),
                "--quiet"]) == 0
    texts = shards.read_table(Layout(root, "f30k").captions, "captions").column("text").to_pylist()
    assert texts[0] == "train image 0 caption 0"
