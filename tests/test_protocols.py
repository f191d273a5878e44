"""ECCV Caption and CxC (training/protocols.py) on pools cut out of the eccv-caption package's own
annotation files: perfect scores from its positives, closed-form chance under random scores, and
the package's own metric functions on the same rankings; the id checks and the CLI wiring."""

import itertools
import json
import warnings

import numpy as np
import pytest

from itmkit.cli import main as pipeline_cli
from pipeline import shards
from pipeline.shards import Layout
from training import evaluate, protocols
from training.evaluation import PROTOCOLS, evaluate_protocol
from training.protocols import Annotations, ProtocolError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # the package warns that ujson is not installed
    from eccv_caption import _metrics as package_metrics


@pytest.fixture(scope="module")
def full():
    return {name: protocols.load_annotations(name) for name in ("eccv", "cxc", "coco")}


def cut(ann: Annotations, images, captions, keep_outside: bool) -> Annotations:
    """The queries of ``ann`` inside a smaller pool; positives outside it are kept (they count in
    R and can never be retrieved, as in the package) or dropped."""
    imgs, caps = set(images), set(captions)

    def queries(pos, own, other):
        out = {q: [p for p in ps if keep_outside or p in other] for q, ps in pos.items() if q in own}
        return {q: ps for q, ps in out.items() if ps}
    return Annotations(ann.name, np.array(sorted(imgs)), np.array(sorted(caps)),
                       queries(ann.i2t, imgs, caps), queries(ann.t2i, caps, imgs), ann.source)


@pytest.fixture(scope="module")
def pool(full):
    """About 300 images and their 1,500 captions: 20 ECCV image queries, the images of all their
    positives (so that those queries keep every positive) and random others."""
    rng = np.random.default_rng(0)
    coco, eccv = full["coco"], full["eccv"]
    seeds = rng.choice(sorted(eccv.i2t), 20, replace=False)
    images = {int(i) for i in seeds}
    images |= {coco.t2i[c][0] for i in seeds for c in eccv.i2t[int(i)] if c in coco.t2i}
    others = np.setdiff1d(coco.image_ids, list(images))
    images |= {int(i) for i in rng.choice(others, 300 - len(images), replace=False)}
    images = sorted(images)
    captions = [c for i in images for c in coco.i2t[i]]
    return np.array(images), np.array(captions)


def shuffled(rng, sims, images, captions):
    """The same matrix with rows and columns in another order: protocols must follow the ids."""
    ri, rc = rng.permutation(len(images)), rng.permutation(len(captions))
    return sims[ri][:, rc], images[ri], captions[rc]


def test_the_package_pools_are_coco_5k_test_with_coco_ids(full):
    for ann in full.values():
        assert len(ann.image_ids) == 5000 and len(np.unique(ann.caption_ids)) == 25000
    coco = full["coco"]
    assert all(len(c) == 5 for c in coco.i2t.values()) and len(coco.t2i) == 25000
    assert (len(full["eccv"].i2t), len(full["eccv"].t2i)) == (1261, 1332)
    assert (len(full["cxc"].i2t), len(full["cxc"].t2i)) == (5000, 24972)
    assert full["eccv"].source.startswith("eccv-caption ")


def test_karpathy_ingest_keeps_coco_ids(full, tmp_path):
    """For COCO, dataset_coco.json's sentid is the COCO caption annotation id and cocoid the image
    id (its first entry is test image 391895 with sentids 770337 ... 781998): the default COCO
    manifest writes them unchanged, which is what the protocols need."""
    coco = full["coco"]
    entries = []
    for k, image_id in enumerate([391895, 60623]):
        sents = [{"raw": f"a caption {c}", "tokens": [], "sentid": c, "imgid": k}
                 for c in sorted(coco.i2t[image_id])]
        entries.append({"filepath": "val2014", "filename": f"COCO_val2014_{image_id:012d}.jpg",
                        "imgid": k, "split": "test", "cocoid": image_id, "sentences": sents,
                        "sentids": [s["sentid"] for s in sents]})
    assert entries[0]["sentids"] == [770337, 771687, 772707, 776154, 781998]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    assert pipeline_cli(["ingest", "--manifest", "manifests/coco.yaml", "--root", str(tmp_path / "data"),
                         "--source-root", str(tmp_path), "--without-images", "--quiet"]) == 0
    caps = shards.read_table(Layout(tmp_path / "data", "coco").captions, "captions").to_pylist()
    assert {(c["image_id"], c["caption_id"]) for c in caps} == {
        (i, c) for i in (391895, 60623) for c in coco.i2t[i]}


@pytest.mark.parametrize("name", ["eccv", "cxc"])
def test_scores_from_the_package_positives_are_perfect(full, pool, name):
    ann = cut(full[name], *pool, keep_outside=False)
    images, captions = pool
    col = {c: j for j, c in enumerate(captions)}
    row = {i: r for r, i in enumerate(images)}
    sims = np.zeros((len(images), len(captions)), np.float32)
    for i, cs in ann.i2t.items():
        sims[row[i], [col[c] for c in cs]] = 1
    for c, imgs in ann.t2i.items():
        sims[[row[i] for i in imgs], col[c]] = 1
    # image->text and text->image positives agree wherever both are queries, so one matrix does
    rng = np.random.default_rng(1)
    protocol = getattr(protocols, name)
    m = protocol(*shuffled(rng, sims, images, captions), annotations=ann)
    scores = {k: v for k, v in m.items() if k[:4] in ("i2t_", "t2i_") or k == "rsum"}
    assert len(scores) in (6, 7) and scores == {k: (600.0 if k == "rsum" else 100.0) for k in scores}
    assert m["queries"]["i2t"] >= 20 and m["queries"]["t2i"] >= 20
    # one positive of a query moved to the bottom: ECCV's mAP@R and R-Precision drop, R@1 stays
    i, cs = next((i, cs) for i, cs in ann.i2t.items() if len(cs) > 1)
    sims[row[i], col[cs[0]]] = -1
    worse = protocol(sims, images, captions, annotations=ann)
    assert worse["i2t_r1"] == 100.0
    if name == "eccv":
        assert worse["i2t_map_at_r"] < 100.0 and worse["i2t_rprecision"] < 100.0
    sims[row[i], [col[c] for c in cs]] = -1                         # all of them: no longer found
    assert protocol(sims, images, captions, annotations=ann)["i2t_r1"] < 100.0


def test_same_rankings_give_the_package_values(full, pool):
    """Random scores, positives outside the pool kept (they count in R): every metric equals the
    package's own function on the ranked lists of the same matrix."""
    images, captions = pool
    rng = np.random.default_rng(2)
    sims = rng.random((len(images), len(captions)))
    i2t, t2i = protocols.ranked_lists(sims, images, captions)
    eccv, cxc = (cut(full[n], *pool, keep_outside=True) for n in ("eccv", "cxc"))
    assert any(not set(ps) <= set(captions) for ps in eccv.i2t.values())   # the case is covered
    ours = protocols.eccv(*shuffled(rng, sims, images, captions), annotations=eccv)
    for d, lists, gt in (("i2t", i2t, eccv.i2t), ("t2i", t2i, eccv.t2i)):
        theirs = package_metrics.compute_eccv_metrics(lists, gt)
        for k in ("map_at_r", "rprecision", "r1"):
            assert ours[f"{d}_{k}"] == pytest.approx(100 * theirs[f"eccv_{k}"], abs=1e-9)
    ours = protocols.cxc(sims, images, captions, annotations=cxc)
    for d, lists, gt in (("i2t", i2t, cxc.i2t), ("t2i", t2i, cxc.t2i)):
        for k in (1, 5, 10):
            theirs = package_metrics.compute_r_at_k(lists, gt, k)
            assert ours[f"{d}_r{k}"] == pytest.approx(100 * theirs, abs=1e-9)
    # and the package's COCO 5K recall is SCAN's recall on the image-major matrix
    coco = cut(full["coco"], *pool, keep_outside=True)
    scan = evaluate_protocol(sims, "coco-5k")
    for k in (1, 5, 10):
        assert scan[f"i2t_r{k}"] == pytest.approx(100 * package_metrics.compute_r_at_k(i2t, coco.i2t, k))
        assert scan[f"t2i_r{k}"] == pytest.approx(100 * package_metrics.compute_r_at_k(t2i, coco.t2i, k))


def test_hand_worked_ranks_ties_count_against():
    # one query over 5 items; positives: items 4 (0.7) and 1 (0.5, tied with item 2), and one
    # positive outside the pool (R = 3). Ranks: item 4 after 0.9 -> 2; item 1 after 0.9, 0.7 and
    # the tied negative -> 4. mAP@R = (1/2) / 3; R-Precision = 1/3 (one of the top 3); R@1 = 0.
    scores = np.array([[0.9, 0.5, 0.5, 0.1, 0.7]])
    ranks = protocols.positive_ranks(scores, np.array([0]), [np.array([1, 4])])
    assert ranks.tolist() == [[2, 4]]
    r = np.array([3])
    assert protocols.map_at_r(ranks, r)[0] == pytest.approx(1 / 6)
    assert protocols.r_precision(ranks, r)[0] == pytest.approx(1 / 3)
    assert protocols.positive_ranks(scores, np.array([0]), [np.array([1, 4])], first=1).tolist() == [[2]]
    # positives tied with each other take consecutive ranks; a constant scorer ranks them last
    assert protocols.positive_ranks(np.zeros((1, 5)), np.array([0]), [np.array([0, 3])]).tolist() == [[4, 5]]
    tied = protocols.positive_ranks(np.array([[1.0, 1.0, 0.0]]), np.array([0]), [np.array([0, 1])])
    assert tied.tolist() == [[1, 2]]


@pytest.mark.parametrize("p,r", [(1, 1), (2, 3), (3, 3), (4, 4)])
def test_chance_closed_form_equals_the_mean_over_all_orders(p, r):
    """Every ranking of a pool of 6 items (720 rows, one query each): the mean of each metric is
    exactly the closed form (p positives in the pool, R - p outside it)."""
    n = 6
    perms = np.array(list(itertools.permutations(range(n))), np.float64)   # row = scores of a query
    ranks = protocols.positive_ranks(perms, np.arange(len(perms)), [np.arange(p)] * len(perms))
    rr = np.full(len(perms), r)
    assert protocols.map_at_r(ranks, rr).mean() == pytest.approx(protocols.chance_map_at_r(n, [p], [r])[0])
    assert protocols.r_precision(ranks, rr).mean() == pytest.approx(p / n)
    for k in (1, 2, 5):
        assert np.mean(ranks[:, 0] <= k) == pytest.approx(protocols.chance_recall(n, [p], k)[0])


def test_random_scores_are_near_chance(full, pool):
    """On the package's positives (pool cut, positives outside it kept), random scores land within
    four standard errors of the closed-form chance reported with the metrics."""
    images, captions = pool
    rng = np.random.default_rng(3)
    eccv, cxc = (cut(full[n], *pool, keep_outside=True) for n in ("eccv", "cxc"))
    runs = [{"eccv": protocols.eccv(s, images, captions, annotations=eccv),
             "cxc": protocols.cxc(s, images, captions, annotations=cxc)}
            for s in (rng.random((len(images), len(captions)), dtype=np.float32) for _ in range(20))]
    checked = 0
    for name in ("eccv", "cxc"):
        chance = runs[0][name]["chance"]
        for k in chance:
            x = np.array([m[name][k] for m in runs])
            assert 0 < chance[k] < (100 if k == "rsum" else 50), (name, k)
            assert abs(x.mean() - chance[k]) < 4 * x.std(ddof=1) / np.sqrt(len(x)), (name, k)
            checked += 1
    assert checked == 13


def test_ids_must_be_the_package_ones(full):
    coco = full["coco"]
    sims = np.zeros((1, 1))
    with pytest.raises(ProtocolError, match=r"5,000 images .* the run has 4,999 images: 0 not among "
                                            r"them, 1 of them missing \(e\.g\. "):
        protocols.eccv(sims, coco.image_ids[:-1], coco.caption_ids)
    running = np.arange(25000)                                      # not COCO's annotation ids
    foreign = len(np.setdiff1d(running, coco.caption_ids))
    with pytest.raises(ProtocolError, match=f"caption annotation ids .* {foreign:,} not among them"):
        protocols.cxc(sims, coco.image_ids, running)
    twice = np.concatenate([coco.image_ids[:-1], coco.image_ids[:1]])
    with pytest.raises(ProtocolError, match="1 repeated"):
        protocols.eccv(sims, twice, coco.caption_ids)
    with pytest.raises(ValueError, match="needs the image and caption ids"):
        evaluate_protocol(sims, "eccv")


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(protocols.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ProtocolError, match="pip install eccv-caption"):
        protocols.load_annotations("eccv")


def test_evaluate_cli_eccv_and_cxc(full, pool, tmp_path, monkeypatch, capsys):
    """--protocol eccv/cxc through evaluate.py (saved similarities of a 'run'); the package's pools
    are swapped for the cut-out one so that a small matrix stands for the COCO 5K test."""
    images, captions = pool
    sims = np.random.default_rng(4).random((len(images), len(captions))).astype(np.float32)
    run = tmp_path / "run"
    run.mkdir()
    evaluate.save_sims(evaluate.sims_path(run, "test"), sims, images, captions,
                       {"dataset": "coco", "shard_hashes": {}})
    assert {"eccv", "cxc", "coco-1k", "coco-5k", "f30k-1k"} <= set(PROTOCOLS)
    with pytest.raises(ProtocolError, match="--protocol eccv is defined on the 5,000 images"):
        evaluate.main([str(run), "--ensemble", str(run), "--protocol", "eccv"])
    monkeypatch.setattr(protocols, "load_annotations",
                        lambda name: cut(full[name], images, captions, keep_outside=True))
    assert evaluate.main([str(run), "--ensemble", str(run), "--protocol", "eccv", "--protocol", "cxc",
                          "--protocol", "coco-5k"]) == 0
    out = capsys.readouterr().out
    assert "eccv (test, 300 images): ECCV i2t mAP@R" in out and "cxc (test, 300 images): CxC i2t R@1" in out
    res = json.loads((run / "eval-ensemble.json").read_text())
    direct = protocols.eccv(sims, images, captions, annotations=cut(full["eccv"], *pool, keep_outside=True))
    assert res["test/eccv"]["i2t_map_at_r"] == pytest.approx(direct["i2t_map_at_r"])
    assert res["test/eccv"]["images"] == 300 and set(res["test/cxc"]["chance"]) >= {"rsum", "t2i_r10"}
    assert res["test/coco-5k"]["chance_rsum"] > 0


@pytest.mark.slow
def test_full_coco_5k_against_the_package_metrics_class(full):
    """The whole 5K x 25K test with the package's default files, through its ``Metrics`` class
    (ranked lists truncated to 50 items, as its example does; ECCV's largest R is 48)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from eccv_caption import Metrics
    coco = full["coco"]
    rng = np.random.default_rng(5)
    images, captions = rng.permutation(coco.image_ids), rng.permutation(coco.caption_ids)
    sims = rng.random((5000, 25000), dtype=np.float32)
    ours = {"eccv": protocols.eccv(sims, images, captions), "cxc": protocols.cxc(sims, images, captions)}
    i2t, t2i = protocols.ranked_lists(sims, images, captions, k=50)
    theirs = Metrics().compute_all_metrics(
        i2t, t2i, target_metrics=("eccv_r1", "eccv_map_at_r", "eccv_rprecision", "cxc_recalls"))
    assert len(theirs) == 6
    for key, d in theirs.items():
        name, metric = key.split("_", 1)
        for direction, value in d.items():
            assert ours[name][f"{direction}_{metric}"] == pytest.approx(100 * value, abs=1e-9), key

