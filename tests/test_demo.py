"""The built-in demo dataset: counts, determinism, boxes, hard-negative pairs, cache reuse."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import demo, shards
from pipeline.shards import Layout

N = 30


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = demo.generate(root, demo.DemoConfig(images=N, seed=3), progress=False)
    return root, summary


def tables(root):
    layout = Layout(root, "demo")
    return {kind: shards.read_table(getattr(layout, kind), kind).to_pylist()
            for kind in ("images", "captions", "boxes", "hard_negatives")}


def test_counts_splits_and_registration(made):
    root, summary = made
    t = tables(root)
    splits = demo.DemoConfig(images=N).splits()
    assert len(t["images"]) == N == sum(splits.values())
    for split, n in splits.items():
        assert sum(r["split"] == split for r in t["images"]) == n
    assert [r["image_id"] for r in t["images"]] == sorted(r["image_id"] for r in t["images"])
    assert len(t["captions"]) == 5 * N
    assert len({r["caption_id"] for r in t["captions"]}) == 5 * N
    per_image = {}
    for r in t["captions"]:
        per_image.setdefault(r["image_id"], []).append(r["caption_id"])
    assert all(len(v) == 5 and v == sorted(v) for v in per_image.values())
    split_of = {r["image_id"]: r["split"] for r in t["images"]}
    assert all(r["split"] == split_of[r["image_id"]] for r in t["captions"])
    index = Layout(root, "demo").index
    for kind in ("images", "captions", "boxes", "hard_negatives"):
        assert len(index.entries(kind)) == 1
    assert index.verify() == []


def test_images_exist_and_boxes_are_inside_and_cover_objects(made):
    root, _ = made
    t = tables(root)
    boxes = {r["image_id"]: r for r in t["boxes"]}
    for img in t["images"]:
        path = Path(img["path"])
        assert path.is_absolute() and path.exists()
        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert pixels.shape == (img["height"], img["width"], 3)
        b = np.asarray(boxes[img["image_id"]]["boxes"]).reshape(-1, 4)
        labels = boxes[img["image_id"]]["labels"]
        assert 2 <= len(b) <= 4 and len(labels) == len(b)
        assert set(labels) <= set(demo.SHAPES)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= img["width"]).all() and (b[:, 3] <= img["height"]).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        # objects do not overlap (a stacked pair may touch)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                w = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                h = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                assert w <= 1 or h <= 1, (img["image_id"], b.tolist())
        # the object differs from the background inside its box, and the box is tight
        background = pixels[0, 0]
        for x1, y1, x2, y2 in b.astype(int):
            inside = np.abs(pixels[y1:y2, x1:x2] - background).sum(-1) > 30
            assert inside.mean() > 0.2
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_captions_mention_objects_attributes_and_relations(made):
    root, _ = made
    texts = [r["text"] for r in tables(root)["captions"]]
    shape_words = {w for ws in demo.SHAPE_WORDS.values() for w in ws}
    relation_words = {p for a, b in demo.RELATIONS.values() for p in a + b} | set(demo.NEAR_WORDS)
    for text in texts:
        assert text.strip() == text and text
        assert any(c in text.split() for c in demo.COLOURS), text
        assert any(re.search(rf"\b{w}", text) for w in shape_words), text
    relational = [t for t in texts if any(f" {p} " in t for p in relation_words)]
    assert len(relational) >= 0.6 * len(texts)
    joined = " ".join(texts)
    assert re.search(r"\b(two|three|four) ", joined)       # counts and plurals
    assert any(w in joined for w in ("striped", "stripy", "dotted", "spotted", "checkered", "checked"))
    assert any(w in joined for w in ("small", "little", "tiny", "large", "big", "huge"))
    assert len(set(texts)) > 0.9 * len(texts)


def test_same_seed_same_bytes_other_seed_differs(made, tmp_path):
    root, _ = made
    demo.generate(tmp_path / "a", demo.DemoConfig(images=N, seed=3), progress=False)
    demo.generate(tmp_path / "b", demo.DemoConfig(images=N, seed=4), progress=False)
    first, again, other = tables(root), tables(tmp_path / "a"), tables(tmp_path / "b")
    for kind in ("captions", "boxes", "hard_negatives"):
        assert first[kind] == again[kind]
    assert [r["text"] for r in first["captions"]] != [r["text"] for r in other["captions"]]
    for a, b in zip(first["images"], again["images"]):
        assert np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))


def test_hard_negative_pairs_differ_as_stated(made):
    root, _ = made
    t = tables(root)
    pairs = t["hard_negatives"]
    assert pairs, "no hard-negative pairs at this size"
    assert {p["kind"] for p in pairs} <= {"attribute", "relation"}
    split_of = {r["image_id"]: r for r in t["images"]}
    captions = {}
    for r in t["captions"]:
        captions.setdefault(r["image_id"], []).append(r["text"])
    for p in pairs:
        a, b = split_of[p["image_id"]], split_of[p["partner_id"]]
        assert a["split"] == b["split"]
        assert not np.array_equal(np.asarray(Image.open(a["path"])), np.asarray(Image.open(b["path"])))
        assert set(captions[a["image_id"]]) != set(captions[b["image_id"]])

    # the scenes behind the files: only the stated difference between the two images
    scenes, pairs_again = demo.build_scenes(demo.DemoConfig(images=N, seed=3))
    assert pairs_again == pairs
    for p in pairs:
        s, o = scenes[p["image_id"]][1], scenes[p["partner_id"]][1]
        (sa, sb), (oa, ob) = s.objects[:2], o.objects[:2]
        assert [x.shape for x in s.objects] == [x.shape for x in o.objects]
        assert [(x.colour, x.size, x.texture, x.cell) for x in s.objects[2:]] == \
               [(x.colour, x.size, x.texture, x.cell) for x in o.objects[2:]]
        if p["kind"] == "relation":
            assert (oa.colour, oa.size, oa.texture) == (sa.colour, sa.size, sa.texture)
            assert (ob.colour, ob.size, ob.texture) == (sb.colour, sb.size, sb.texture)
            assert (oa.cell, ob.cell) == (sb.cell, sa.cell)
            opposite = {"left": "right", "right": "left", "above": "below", "below": "above",
                        "on": "under", "under": "on"}
            assert o.relation == opposite[s.relation]
        else:
            attr = o.swapped
            assert attr in ("colour", "size", "texture")
            assert getattr(oa, attr) == getattr(sb, attr) != getattr(sa, attr) == getattr(ob, attr)
            for other in {"colour", "size", "texture"} - {attr}:
                assert getattr(oa, other) == getattr(sa, other) and getattr(ob, other) == getattr(sb, other)
            assert (oa.cell, ob.cell) == (sa.cell, sb.cell) and o.relation == s.relation
            # every focus caption names the swapped attribute, so text tells the two apart
            if attr == "colour":
                assert sum(sa.colour in c and sb.colour in c for c in o.captions) >= 3


def test_second_run_is_skipped_and_new_seed_regenerates(tmp_path):
    cfg = demo.DemoConfig(images=12, seed=1)
    assert not demo.generate(tmp_path, cfg, progress=False)["skipped"]
    layout = Layout(tmp_path, "demo")
    mtime = layout.captions.stat().st_mtime_ns
    assert demo.generate(tmp_path, cfg, progress=False)["skipped"]
    assert layout.captions.stat().st_mtime_ns == mtime
    # a lost PNG is redrawn, the others are reused
    Path(shards.read_table(layout.images, "images")["path"][0].as_py()).unlink()
    s = demo.generate(tmp_path, cfg, force=True, progress=False)
    assert s["rendered"] == 12  # --force redraws all
    (tmp_path / "demo" / "images" / "000003.png").unlink()
    layout.index.unregister("captions")
    s = demo.generate(tmp_path, cfg, progress=False)
    assert not s["skipped"] and s["rendered"] == 1
    s = demo.generate(tmp_path, demo.DemoConfig(images=12, seed=2), progress=False)
    assert s["rendered"] == 12
    assert layout.index.stale("captions", s["config_hash"]) == []


def test_cli_summary_and_bad_arguments(tmp_path):
    cmd = [sys.executable, "-m", "itmkit", "demo", "--root", str(tmp_path), "--images", "8", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "demo: wrote 8 images" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "up to date" in r.stdout
    r = subprocess.run(cmd[:-2] + ["2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--images must be at least 4" in r.stderr
