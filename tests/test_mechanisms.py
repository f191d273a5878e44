"""benchmarks/mechanisms.py: the attention statistics on a hand-made graph, the caption split, and
the diagnostics of tiny trained cimn and dsrln runs."""

import dataclasses
import math
import re
import sys
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.shards import VOCAB_SPECIALS, Vocabulary
from training import train
from training.data import eval_loaders
from training.run import load_run
from training.data import collate_text
from training.synthetic import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mechanisms  # noqa: E402


def test_attention_stats_by_hand():
    # node 0 attends .5 to itself, .5 to node 1; node 1 all to node 0; node 2 is padding
    att = torch.tensor([[[.5, .5, 0], [1, 0, 0], [0, 0, 0]]])
    mask = torch.tensor([[True, True, False]])
    pairs = torch.tensor([[[False, True, True], [True, False, True], [True, True, False]]])
    s = mechanisms.attention_stats(att, mask, {"g": pairs})
    assert s["rows"] == 2
    assert s["entropy"] == pytest.approx((math.log(2) + 0) / 2)
    assert s["uniform"] == pytest.approx(math.log(2))
    assert s["self"] == pytest.approx(0.25)
    assert s["g"] == pytest.approx((0.75, 0.5))        # shares .5 and 1; uniform 1/2 each
    merged = mechanisms._merge([s, dict(s, rows=6, self=0.5)])
    assert merged["rows"] == 8 and merged["self"] == pytest.approx((2 * 0.25 + 6 * 0.5) / 8)


def test_real_cosines_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    r = 2 ** -0.5
    assert mechanisms._real_cosines(x) == pytest.approx([r, 0.0, r, r, 0.0, r])


def test_box_iou():
    boxes = torch.tensor([[[0, 0, .5, .5], [.25, .25, .75, .75], [.6, .6, 1, 1]]])
    iou = mechanisms.box_iou(boxes)
    assert iou[0, 0, 1] == pytest.approx(0.0625 / (0.25 + 0.25 - 0.0625))
    assert iou[0, 0, 2] == 0 and iou[0, 1, 2] > 0 and iou[0, 2, 2] == pytest.approx(1)


def test_captions_split_by_naming_the_background():
    words = ["a", "red", "circle", "on", "the", "grass", "square"]
    vocab = Vocabulary({"words": [[w, 0] for w in VOCAB_SPECIALS] + [[w, 1] for w in words], "min_count": 1,
                        "predicates": [], "attributes": []})
    empty = np.zeros(0, dtype=np.int64)
    texts = [collate_text([{"caption_id": j, "image_id": j // 2, "tokens": np.array(vocab.encode(c.split())), **{
        k: empty for k in ("obj_index", "obj_word", "attr_object", "attr_id", "attr_word",
                        "rel_subject", "rel_predicate", "rel_object")}}
        for j, c in enumerate(["a red circle on the grass", "a square", "a circle", "grass"])])]
    groups = mechanisms.caption_groups(vocab, texts, {"grass", "sea"})
    assert groups == {"names the background": [(0, 0), (3, 1)], "does not": [(1, 0), (2, 1)]}
    flat = mechanisms.caption_groups(vocab, texts, set())
    assert list(flat) == ["all captions (none names a background)"] and len(flat[next(iter(flat))]) == 4


def test_partner_cosines_by_hand(monkeypatch):
    monkeypatch.setattr(mechanisms, "hard_negative_pairs", lambda layout: [
        {"image_id": 0, "partner_id": 1, "kind": "relation"},
        {"image_id": 0, "partner_id": 9, "kind": "relation"},      # partner not in the split: skipped
        {"image_id": 2, "partner_id": 3, "kind": "attribute"}])
    run = SimpleNamespace(data=SimpleNamespace(layout=None))
    nodes = {0: torch.tensor([[1., 0.], [0., 1.]]), 1: torch.tensor([[0., 2.], [0., 1.]]),
             2: torch.tensor([[1., 1.]]), 3: torch.tensor([[1., -1.]])}
    boxes = {0: torch.tensor([[0., 0., .1, .1], [.5, .5, .6, .6]]),
             1: torch.tensor([[.3, 0., .4, .1], [.5, .5, .6, .6]])}     # box 0 moved, box 1 did not
    assert mechanisms.partner_cosines(run, "relation", [nodes]) == (1, [pytest.approx(0.5)])
    assert mechanisms.partner_cosines(run, "relation", [nodes, nodes], boxes) == (1, [0.0, 0.0])
    assert mechanisms.partner_cosines(run, "attribute", [nodes]) == (1, [0.0])


def table_rows(text: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first}")]


def test_cimn_and_dsrln_runs(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    make_dataset(root, splits={"train": 20, "val": 6, "test": 6}, dim=32, grid_hw=(3, 3))
    small = ["--epochs", "1", "--batch-size", "10", "--workers", "0", "--set", "embed_dim=16", "--set", "word_dim=8"]
    for model in ("cimn", "dsrln"):
        extra = ["--set", "grid_dim=32", "--set", "heads=2"] if model == "dsrln" else []
        assert train.main(["--model", model, "--dataset", "synth", "--root", str(root),
                           "--out", str(tmp_path / model), *small, *extra]) == 0
    capsys.readouterr()

    assert mechanisms.main([str(tmp_path / "cimn"), "--root", str(root), "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    frr = table_rows(out, "image") + table_rows(out, "text")
    assert [r[:2] for r in frr] == [["image", "1"], ["image", "2"], ["text", "1"], ["text", "2"]]
    for r in frr:
        entropy, uniform, self_share = float(r[3]), float(r[4]), float(r[5])
        assert 0 <= entropy <= uniform + 1e-6 and 0 <= self_share <= 1
    gl = {r[0]: r for r in table_rows(out, "easy") + table_rows(out, "hard")}
    assert sum(int(r[1]) for r in gl.values()) == 2 * 6          # every image and caption anchors
    for r in gl.values():
        if int(r[1]):
            s, mass = float(r[2]), float(r[3])
            assert mass == pytest.approx(2 - s, abs=2e-3)         # the mass law, read back
            assert 0 < float(r[4]) <= 1 and 1 <= float(r[5]) <= 2  # 2 negatives per anchor in a batch of 3
    if int(gl["easy"][1]):
        assert float(gl["easy"][6]) == 0                       # no negative within the margin: no loss
    assert mechanisms.main([str(tmp_path / "cimn"), "--root", str(root), "--split", "test"]) == 0
    out = capsys.readouterr().out
    pairs = {r[0]: r for r in table_rows(out, "attribute") + table_rows(out, "random images")}
    assert int(pairs["attribute"][1]) == 3 and 1 <= int(pairs["random images"][1]) <= 6
    for r in pairs.values():
        lo, mean, hi = float(r[3]), float(r[2]), float(r[4])
        assert -1 - 1e-6 <= lo <= mean <= hi <= 1 + 1e-6

    assert mechanisms.main([str(tmp_path / "dsrln"), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "all captions")
    assert len(rows) == 1 and int(rows[0][1]) == 6 * 5
    assert 0 < float(rows[0][2]) < 1 and float(rows[0][2]) + float(rows[0][4]) == pytest.approx(1, abs=2e-3)
    # a build whose captions name backgrounds (here: a shape word stands in for one)
    monkeypatch.setattr(mechanisms, "background_words", lambda: {"circle"})
    assert mechanisms.main([str(tmp_path / "dsrln"), "--root", str(root)]) == 0
    out = capsys.readouterr().out
    captions = table_rows(out, "names the background") + table_rows(out, "does not")
    images = table_rows(out, "images: some caption") + table_rows(out, "images: no caption")
    assert sum(int(r[1]) for r in captions) == 6 * 5 and all(int(r[1]) for r in captions)
    assert sum(int(r[1]) for r in images) == 6
    gisa = table_rows(out, "two regions")
    assert len(gisa) == 1 and len(gisa[0]) == 4 and all(-1 <= float(c) <= 1 for c in gisa[0][1:])
    layer = table_rows(out, "1")
    assert len(layer) == 1
    masked, self_masked, alone, entropy, appearance, uniform = (float(c) for c in layer[0][1:7])
    assert 0 <= masked <= 1 and 0 <= self_masked <= 1 and 0 <= alone <= 1
    assert 0 <= entropy <= uniform + 1e-6 and 0 <= appearance <= uniform + 1e-6
    # relation networks' weight at its extremes: every pair masked, or none; image 1 made the
    # relation-swapped partner of image 0 (its first two boxes trade places)
    run = load_run(str(tmp_path / "dsrln"), str(root), split="val")
    images = [b.to("cpu") for b in eval_loaders(run.data, 32)[0]]
    first = images[0]
    boxes, mask = first.boxes.clone(), first.region_mask.clone()
    mask[1] = mask[0] = True                                          # as many regions in both
    boxes[1] = boxes[0][[1, 0, *range(2, boxes.shape[1])]]
    images[0] = dataclasses.replace(first, boxes=boxes, region_mask=mask)
    ids = first.image_ids.tolist()
    with monkeypatch.context() as patch:
        patch.setattr(mechanisms, "hard_negative_pairs",
                      lambda layout: [{"image_id": ids[0], "partner_id": ids[1], "kind": "relation"}])
        for bias, share in ((-100.0, 1.0), (100.0, 0.0)):
            with torch.no_grad():
                for gisa_layer in run.model.gisa:
                    gisa_layer.geo_weight.weight.zero_()
                    gisa_layer.geo_weight.bias.fill_(bias)
            layer, focus = table_rows("\n".join(mechanisms.gisa_attention(run, images, None, None)), "1")
            assert [float(c) for c in layer[1:4]] == [share] * 3
            other, own, masked = (float(c) for c in focus[1:4])
            assert masked == share and 0 < other and 0 < own and other + own <= 1 + 1e-6
        with torch.no_grad():
            for gisa_layer in run.model.gisa:
                gisa_layer.geo_query.zero_()    # no interaction either: the appearance logits alone
        row = table_rows("\n".join(mechanisms.gisa_attention(run, images, None, None)), "1")[0]
        assert row[4] == row[5] and row[7] == row[8]

    assert train.main(["--model", "resg", "--dataset", "synth", "--root", str(root),
                       "--out", str(tmp_path / "resg"), *small]) == 0
    capsys.readouterr()
    assert mechanisms.main([str(tmp_path / "resg"), "--root", str(root), "--split", "test"]) == 0
    out = capsys.readouterr().out
    rounds = table_rows(out, "1")
    assert len(rounds) == 1 and int(rounds[0][1]) == 6 * 6     # every real region of the 6 test images
    entropy, uniform, self_share, update = (float(rounds[0][i]) for i in (2, 3, 4, 7))
    assert 0 <= entropy <= uniform + 1e-6 and 0 <= self_share <= 1 and update > 0
    cosines = table_rows(out, "two regions") + table_rows(out, "one box")
    assert len(cosines) == 2 and "(3 pairs)" in cosines[1][0]    # the synthetic test split's attribute pairs
    assert all(-1 <= float(c) <= 1 for r in cosines for c in r[1:])

    assert train.main(["--model", "vsepp", "--dataset", "synth", "--root", str(root),
                       "--out", str(tmp_path / "vsepp"), *small]) == 0
    with pytest.raises(SystemExit, match=re.escape("no diagnostics for model 'vsepp'; models with some: cimn, dsrln, resg")):
        mechanisms.main([str(tmp_path / "vsepp"), "--root", str(root)])
