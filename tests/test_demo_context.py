"""The demo's context scenes (``--scenes context``): backdrops outside the boxes and named by the
captions, captions of mixed specificity, geometric relations, the new hard-negative kinds and
their way into the evaluation; and the flat demo left exactly as it was."""

import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itmkit.cli import main
from pipeline import backdrops, demo, demo_context, shards
from pipeline.shards import Layout
from training.evaluation import hard_negative_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402

N = 16
SIZE = 160
# fingerprint() of the flat build images=30, seed=3, computed with the generator as it was before
# scenes had a choice: a flat build must stay byte-identical (captions, boxes, pairs, pixels,
# PNG tags and the recorded config and its hash)
FLAT_FINGERPRINT = "bfa40ca9c07dd7e247bc77f6151d0f7fed277791b13be9849b9ebc4276e2d5f1"


def fingerprint(root: Path) -> str:
    layout = Layout(root, "demo")
    h = hashlib.sha256()
    for kind in ("images", "captions", "boxes", "hard_negatives"):
        path = getattr(layout, kind)
        rows = shards.read_table(path, kind).to_pylist()
        if kind == "images":
            for r in rows:
                with Image.open(r["path"]) as im:
                    h.update(np.asarray(im).tobytes())
                    h.update(im.info["itmkit"].encode())
                r["path"] = Path(r["path"]).name
        meta = shards.table_metadata(path)
        h.update(json.dumps([rows, meta["config"], meta["config_hash"]], sort_keys=True).encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built():
    """Scenes and pairs of a 240-image context build (no pixels drawn)."""
    return demo.build_scenes(demo.DemoConfig(images=240, seed=5, scenes="context"))


def centre(b):
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def test_flat_build_is_unchanged(tmp_path):
    demo.generate(tmp_path, demo.DemoConfig(images=30, seed=3, scenes="flat"), progress=False)
    assert fingerprint(tmp_path) == FLAT_FINGERPRINT
    assert "scenes" not in demo.DemoConfig().record()
    context = demo.DemoConfig(scenes="context").record()
    assert context["scenes"] == "context" and context["context_version"] == demo.CONTEXT_VERSION


def test_context_build_is_deterministic_per_seed(tmp_path):
    def build(name, seed):
        demo.generate(tmp_path / name, demo.DemoConfig(images=N, seed=seed, scenes="context"), progress=False)
        layout = Layout(tmp_path / name, "demo")
        files = {kind: getattr(layout, kind).read_bytes() for kind in ("captions", "boxes", "hard_negatives")}
        files.update({p.name: p.read_bytes() for p in sorted((layout.dir / "images").glob("*.png"))})
        return files

    first, again, other = build("a", 7), build("b", 7), build("c", 8)
    assert len(first) == 3 + N and first == again
    assert first["captions"] != other["captions"]
    # the files hold the scenes the other tests check
    scenes, pairs = demo.build_scenes(demo.DemoConfig(images=N, seed=7, scenes="context"))
    layout = Layout(tmp_path / "a", "demo")
    texts = [r["text"] for r in shards.read_table(layout.captions, "captions").to_pylist()]
    assert texts == [t for _, s in scenes for t in s.captions]
    assert shards.read_table(layout.hard_negatives, "hard_negatives").to_pylist() == pairs
    assert [r["labels"] for r in shards.read_table(layout.boxes, "boxes").to_pylist()] == \
           [[o.shape for o in s.objects] for _, s in scenes]
    # a context build and a flat build of one seed are different datasets with different hashes
    flat = demo.generate(tmp_path / "flat", demo.DemoConfig(images=N, seed=7), progress=False)
    assert flat["config_hash"] != shards.table_metadata(Layout(tmp_path / "a", "demo").captions)["config_hash"]


def test_backdrops_lie_outside_every_box_and_are_textured(built):
    scenes, _ = built
    for _, scene in scenes[:40]:
        pixels, boxes = demo.render(scene, SIZE)
        other = demo_context.swap_backdrop(np.random.default_rng(0), scene, SIZE)
        other_pixels, other_boxes = demo.render(other, SIZE)
        assert boxes == other_boxes
        inside = np.zeros((SIZE, SIZE), bool)
        for x1, y1, x2, y2 in np.asarray(boxes, int):
            inside[y1:y2, x1:x2] = True
        # another backdrop changes nothing inside the boxes and most of what lies outside them
        assert np.array_equal(pixels[inside], other_pixels[inside])
        assert (np.abs(pixels[~inside].astype(int) - other_pixels[~inside]).sum(-1) > 30).mean() > 0.5
    # textured, not flat: neighbouring pixels differ; and no two backdrops look alike on average
    drawn = {name: backdrops.draw(name, 1, SIZE) for name in backdrops.BACKDROPS}
    for name, img in drawn.items():
        grey = img.mean(-1)
        assert np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean() > 4, name
    names = list(drawn)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(drawn[a].mean((0, 1)) - drawn[b].mean((0, 1))).sum() > 40, (a, b)


def test_every_caption_names_its_own_backdrop(built):
    scenes, _ = built
    assert {s.backdrop for _, s in scenes} == set(backdrops.BACKDROPS)
    for _, scene in scenes:
        for text in scene.captions:
            named = {name for name, phrases in backdrops.BACKDROP_WORDS.items() if any(p in text for p in phrases)}
            assert named == {scene.backdrop}, (scene.backdrop, text)


def test_specificity_shares_and_what_each_level_names(built):
    scenes, pairs = built
    paired = {p[k] for p in pairs for k in ("image_id", "partner_id")}
    plain = [s for i, (_, s) in enumerate(scenes) if i not in paired and not s.near_duplicate]
    levels = Counter(level for s in plain for level in s.levels)
    total = sum(levels.values())
    for level, share in demo_context.SPECIFICITY.items():
        assert levels[level] / total == pytest.approx(share, abs=0.05), (level, levels)
    # a small share of near-duplicates, each right after the scene it copies
    dups = [i for i, (_, s) in enumerate(scenes) if s.near_duplicate]
    assert 0 < len(dups) < 0.1 * len(scenes)
    for i in dups:
        a, b = scenes[i - 1][1], scenes[i][1]
        assert [(o.shape, o.colour, o.texture, o.size) for o in a.objects] == \
               [(o.shape, o.colour, o.texture, o.size) for o in b.objects]
        assert a.backdrop == b.backdrop and a.captions != b.captions
        assert max(abs(o.cx - p.cx) + abs(o.cy - p.cy) for o, p in zip(a.objects, b.objects)) <= 4

    def shapes_named(text):
        return {shape for shape, words in demo.SHAPE_WORDS.items()
                if any(re.search(rf"\b{w}", text) for w in words)}

    for _, s in scenes:
        for text, level in zip(s.captions, s.levels):
            if level == "full":     # every object: its shape and colour
                assert shapes_named(text) == {o.shape for o in s.objects}, text
                assert all(o.colour in text for o in s.objects), text
            elif level == "pair":
                assert shapes_named(text) == {o.shape for o in s.objects[:2]}, text
            elif level in ("object", "single"):
                assert len(shapes_named(text)) == 1, text
            else:                   # the scene and a count, no object named
                assert level == "scene" and not shapes_named(text), text
                assert f"{demo.NUMBERS[len(s.objects)]} shapes" in text
                assert not any(c in text.split() for c in demo.COLOURS), text


def test_stated_relations_agree_with_the_boxes(built):
    scenes, _ = built
    stated, entangled = Counter(), 0
    for _, s in scenes:
        boxes = [demo.tight_box(m) for m in demo.object_masks(s, SIZE)]   # render()'s boxes, no pixels
        if len(s.objects) > 1:
            assert (0, s.relation, 1) in s.facts or not {"full", "pair"} & set(s.levels)
        for i, rel, j in s.facts:
            a, b = boxes[i], boxes[j]
            (ax, ay), (bx, by) = centre(a), centre(b)
            dx, dy = bx - ax, by - ay
            w = min(a[2], b[2]) - max(a[0], b[0])
            h = min(a[3], b[3]) - max(a[1], b[1])
            check = {
                "left": dx > 0 and abs(dx) > abs(dy), "right": dx < 0 and abs(dx) > abs(dy),
                "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx),
                "on": dy > 0 and w > 0 and 0 <= b[1] - a[3] <= 0.2 * (b[3] - a[1]),
                "under": dy < 0 and w > 0 and 0 <= a[1] - b[3] <= 0.2 * (a[3] - b[1]),
                "overlapping": w > 1 and h > 1, "touching": w > -2 and h > -2,
                "near": np.hypot(max(0, -w), max(0, -h)) <= 0.15 * SIZE,
            }[rel]
            assert check, (rel, a, b, s.captions)
            stated[rel] += 1
        entangled += box_overlap(boxes[0], boxes[1]) if len(boxes) > 1 else 0
    assert set(stated) == set(demo.RELATIONS) | {"overlapping", "touching", "near"}, stated
    assert entangled > 0.1 * len(scenes)


def box_overlap(a, b) -> bool:
    return min(a[2], b[2]) - max(a[0], b[0]) > 1 and min(a[3], b[3]) - max(a[1], b[1]) > 1


def test_hard_negative_pairs_differ_in_what_their_kind_says(built):
    scenes, pairs = built
    assert {p["kind"] for p in pairs} == set(demo_context.PARTNERS)

    def look(o):
        return o.shape, o.colour, o.size, o.texture

    for p in pairs:
        (split_a, s), (split_b, o) = scenes[p["image_id"]], scenes[p["partner_id"]]
        assert split_a == split_b and p["partner_id"] == p["image_id"] + 1
        kind = p["kind"]
        if kind == "context":
            assert [vars(x) for x in s.objects] == [vars(x) for x in o.objects]
            assert s.backdrop != o.backdrop
            continue
        assert s.backdrop == o.backdrop and s.backdrop_seed == o.backdrop_seed
        if kind == "specificity":
            assert len(s.objects) >= 2 and [vars(x) for x in o.objects] == [vars(s.objects[0])]
            # each caption true of exactly one image: the scene's name a second object or count
            # two or more, the partner's say its one object is the only one
            assert set(s.levels) <= {"full", "pair", "scene"} and set(o.levels) == {"single"}
            for text in o.captions:
                assert re.search(r"\b(a single|only one|just one|on its own|one shape|nothing else)\b", text), text
            continue
        assert [look(x) for x in s.objects[2:]] == [look(x) for x in o.objects[2:]]
        assert [(x.cx, x.cy) for x in s.objects[2:]] == [(x.cx, x.cy) for x in o.objects[2:]]
        assert set(s.levels) | set(o.levels) <= {"full", "pair"}   # every caption states the focus pair
        (sa, sb), (oa, ob) = s.objects[:2], o.objects[:2]
        if kind == "relation":
            assert (look(oa), look(ob)) == (look(sa), look(sb))
            assert o.relation == demo_context.OPPOSITE[s.relation]
        else:
            assert kind == "attribute" and o.swapped in ("colour", "texture")
            attr = o.swapped
            assert getattr(oa, attr) == getattr(sb, attr) != getattr(sa, attr) == getattr(ob, attr)
            assert [(x.cx, x.cy, x.size) for x in (sa, sb)] == [(x.cx, x.cy, x.size) for x in (oa, ob)]


def test_every_kind_in_the_file_reaches_the_evaluation_and_the_table(built):
    scenes, pairs = built
    kinds = {p["kind"] for p in pairs}
    ids = np.arange(len(scenes))
    rng = np.random.default_rng(0)
    sims = rng.random((len(scenes), 5 * len(scenes))) * 0.1
    for i in ids:
        sims[i, 5 * i:5 * i + 5] += 1.0     # a model that knows every image's own captions
    hn = hard_negative_accuracy(sims, ids, pairs)
    assert set(hn) == kinds
    assert all(v["i2t_acc"] == 100.0 and v["t2i_acc"] == 100.0 for v in hn.values())
    assert sum(v["pairs"] for v in hn.values()) == len(pairs)
    figures = compare.run_figures({"test/f30k-1k": {k: 1.0 for k in ("rsum", "i2t_r1", "i2t_r5", "i2t_r10",
                                                                     "t2i_r1", "t2i_r5", "t2i_r10")},
                                   "test/hard_negatives": hn}, 1.0, {"train_s": 1.0}, "test/f30k-1k", "test")
    head = compare.table({"vsepp": [figures]})[0]
    for kind in kinds:
        assert f"{kind} i2t %" in head and f"{kind} t2i %" in head


def test_cli_and_manifest_take_the_option(tmp_path, capsys):
    assert main(["demo", "--root", tmp_path / "a", "--images", 8, "--scenes", "context", "--quiet"]) == 0
    assert "demo: wrote 8 images" in capsys.readouterr().out
    assert main(["ingest", "--manifest", "demo", "--root", tmp_path / "b", "--set", "demo.images=8",
                 "--set", "demo.scenes=context", "--set", "expected=null", "--quiet"]) == 0
    by_demo, by_ingest = Layout(tmp_path / "a", "demo"), Layout(tmp_path / "b", "demo")
    assert by_demo.captions.read_bytes() == by_ingest.captions.read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["demo", "--root", tmp_path, "--images", 8, "--scenes", "busy"])
    assert e.value.code == 2 and "--scenes" in capsys.readouterr().err


def test_pair_kinds_draws_only_the_kinds_named(tmp_path, capsys):
    scenes, pairs = demo.build_scenes(demo.DemoConfig(images=120, seed=5, scenes="context",
                                                      pair_kinds="relation", pair_fraction=0.5))
    assert len(pairs) > 20 and {p["kind"] for p in pairs} == {"relation"}
    two = demo.build_scenes(demo.DemoConfig(images=120, seed=5, scenes="context", pair_kinds="context, specificity"))[1]
    assert {p["kind"] for p in two} == {"context", "specificity"}
    # not recorded at its default, so every build made before it keeps its config hash
    assert "pair_kinds" not in demo.DemoConfig(scenes="context").record()
    assert demo.DemoConfig(scenes="context", pair_kinds="relation").record()["pair_kinds"] == "relation"
    for argv, said in ((["--pair-kinds", "relation"], "add --scenes context"),
                       (["--scenes", "context", "--pair-kinds", "relation,nope"], "unknown kind(s) nope")):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--root", tmp_path, "--images", 8, *argv])
        assert e.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
    # the manifest takes it too, and both ways write the same build
    assert main(["demo", "--root", tmp_path / "a", "--images", 16, "--scenes", "context", "--pair-kinds",
                 "relation", "--pair-fraction", 1, "--quiet"]) == 0
    assert main(["ingest", "--manifest", "demo", "--root", tmp_path / "b", "--set", "demo.images=16",
                 "--set", "demo.scenes=context", "--set", "demo.pair_kinds=relation", "--set",
                 "demo.pair_fraction=1", "--set", "expected=null", "--quiet"]) == 0
    by_demo, by_ingest = Layout(tmp_path / "a", "demo"), Layout(tmp_path / "b", "demo")
    assert by_demo.captions.read_bytes() == by_ingest.captions.read_bytes()
    pairs = shards.read_table(by_demo.hard_negatives, "hard_negatives").to_pylist()
    assert pairs == shards.read_table(by_ingest.hard_negatives, "hard_negatives").to_pylist()
    assert pairs and {r["kind"] for r in pairs} == {"relation"}
