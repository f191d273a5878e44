"""Shortlist and re-rank (training/shortlist.py): candidates, hand-worked rankings of both
directions, re-ranking everything equals full scoring, fusion, padded gathering of encodings of
different batches, and the evaluate.py / train.py wiring (retrieval's use: tests/test_retrieve.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import evaluate, protocols, train
from training.evaluation import (compute_sims, encode, evaluate_protocol, hard_negative_accuracy,
                                 recall_metrics)
from training.protocols import Annotations
from training.shortlist import Shortlist, score_pairs, standardise, take, top_k

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_top_k_best_first_ties_in_column_order_and_k_clipped():
    s = np.array([[0.1, 0.9, 0.5, 0.9], [0.0, 0.0, 0.0, 1.0]])
    assert top_k(s, 2).tolist() == [[1, 3], [3, 0]]
    assert top_k(s, 10).shape == (2, 4)


# 2 images x 10 captions (caption j belongs to image j // 5), fast (shortlisting) and slow scores
FAST = np.array([[0.9, 0.8, 0.1, 0.1, 0.1, 0.7, 0.6, 0.5, 0.4, 0.3],
                 [0.2, 0.3, 0.4, 0.5, 0.6, 0.1, 0.1, 0.1, 0.1, 0.0]], np.float32)
SLOW = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9],
                 [0.5, 0.5, 0.5, 0.5, 0.5, 0.9, 0.1, 0.2, 0.3, 0.4]], np.float32)


def _scores(shortlist, slow):
    return slow[shortlist.pairs[:, 0], shortlist.pairs[:, 1]]


def test_hand_worked_two_directions():
    sl = Shortlist.from_sims(FAST, 2)
    # image 0's candidates: captions 0, 1; image 1's: 4, 3. Caption j's: the better image by FAST
    assert sl.i2t.tolist() == [[0, 1], [4, 3]]
    assert sl.t2i[:, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0] and sl.t2i.shape == (10, 2)
    assert len(sl.pairs) == 20 and len(np.unique(sl.pairs, axis=0)) == 20   # 2 x 10 all needed here
    i2t, t2i = sl.rankings(_scores(sl, SLOW))
    # image 0: slow re-orders its two candidates (1 above 0), both above the 8 others
    assert np.argsort(-i2t[0], kind="stable")[:3].tolist() == [1, 0, 5]
    m = recall_metrics(i2t, t2i_sims=t2i)
    # image 0: caption 1 is its own -> rank 1. Image 1's candidates 4, 3 are image 0's captions; its
    # own 5-9 are not candidates and keep FAST's rank: below captions 0-4 -> rank 6
    assert (m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["i2t_meanr"]) == (50.0, 50.0, 100.0, 3.5)
    # every caption has both images as candidates: SLOW decides; captions 0-3 prefer image 1, 4
    # and 5 tie (against the model), 6-9 prefer image 0: no caption finds its own image first
    assert m["t2i_r1"] == 0.0 and m["t2i_meanr"] == 2.0
    with pytest.raises(ValueError, match="k >= 1"):
        Shortlist.from_sims(FAST, 0)


def test_ground_truth_outside_the_shortlist_keeps_the_shortlisting_rank():
    """K = 1: only each query's first candidate is re-scored; an own caption ranked 3rd by FAST
    stays 3rd even though SLOW would put it first."""
    fast = np.array([[0.9, 0.8, 0.7, 0.0, 0.0, 0.95, 0.85, 0.0, 0.0, 0.0],
                     [0.0] * 5 + [1.0] * 5], np.float32)
    slow = np.zeros_like(fast)
    slow[0, :5] = 1.0                     # SLOW knows image 0's captions perfectly
    sl = Shortlist.from_sims(fast, 1)
    i2t, t2i = sl.rankings(_scores(sl, slow))
    ranks = lambda row: 1 + np.argsort(-row, kind="stable").argsort()   # noqa: E731
    assert ranks(i2t[0])[0] == 2           # FAST order: 5 (shortlisted, slow 0.0), then 0
    assert ranks(fast[0])[0] == 2
    sl3 = Shortlist.from_sims(fast, 3)      # 5, 0, 6 shortlisted: SLOW puts caption 0 first
    i2t, _ = sl3.rankings(_scores(sl3, slow))
    assert ranks(i2t[0])[0] == 1


def test_reranking_everything_equals_full_scoring():
    rng = np.random.default_rng(0)
    fast, slow = rng.random((12, 60), dtype=np.float32), rng.random((12, 60), dtype=np.float32)
    sl = Shortlist.from_sims(fast, 60)
    i2t, t2i = sl.rankings(_scores(sl, slow))
    assert recall_metrics(i2t, t2i_sims=t2i) == recall_metrics(slow)
    pairs = [{"image_id": 0, "partner_id": 1, "kind": "attribute"}]
    assert hard_negative_accuracy(i2t, np.arange(12), pairs, t2i_sims=t2i) == \
        hard_negative_accuracy(slow, np.arange(12), pairs)
    # re-scoring the shortlist with the shortlisting scores themselves changes nothing
    sl5 = Shortlist.from_sims(fast, 5)
    same = sl5.rankings(_scores(sl5, fast))
    assert recall_metrics(same[0], t2i_sims=same[1]) == recall_metrics(fast)


def test_ties_among_the_candidates_count_against_the_model():
    fast = np.tile(np.linspace(1, 0, 10, dtype=np.float32), (2, 1))
    sl = Shortlist.from_sims(fast, 10)
    i2t, t2i = sl.rankings(np.zeros(len(sl.pairs), np.float32))   # a constant re-ranker
    m = recall_metrics(i2t, t2i_sims=t2i)
    assert m == recall_metrics(np.zeros((2, 10)))


def test_fusion():
    rng = np.random.default_rng(1)
    fast, slow = rng.random((10, 50), dtype=np.float32), rng.random((10, 50), dtype=np.float32)
    sl = Shortlist.from_sims(fast, 8)
    scores = _scores(sl, slow)
    i2t, t2i = sl.rankings(scores)
    plain = recall_metrics(i2t, t2i_sims=t2i)
    one = sl.rankings(scores, fuse=1.0)
    assert recall_metrics(one[0], t2i_sims=one[1]) == plain          # all weight on the re-ranker
    zero = sl.rankings(scores, fuse=0.0)
    assert recall_metrics(zero[0], t2i_sims=zero[1]) == recall_metrics(fast)   # all on the shortlister
    # hand-worked standardisation: [1, 2, 3] -> [-1.22, 0, 1.22]; a constant row -> 0
    z = standardise(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert z[0] == pytest.approx([-1.2247449, 0.0, 1.2247449]) and (z[1] == 0).all()
    half = sl.rankings(scores, fuse=0.5)[0]
    q = 3
    cand = sl.i2t[q]
    mix = 0.5 * standardise(slow[q, cand][None]) + 0.5 * standardise(fast[q, cand][None])
    assert np.argsort(-half[q, cand], kind="stable").tolist() == np.argsort(-mix[0], kind="stable").tolist()
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        sl.rankings(scores, fuse=1.5)


# ---------------------------------------------------------------------------------------------
# scoring pairs from per-batch encodings of different padded widths

class _Ragged(torch.nn.Module):
    """A 'cross-attention' model whose encodings are padded sequences with masks: the score of a
    pair is the dot product of the masked means; padding must not change it."""
    two_tower = False
    calls = 0

    def encode_image(self, x):
        return x

    def encode_text(self, x):
        return x

    def similarity(self, a, b):
        type(self).calls += 1
        ma = (a["x"] * a["mask"][..., None]).sum(1) / a["mask"].sum(1, keepdim=True)
        mb = (b[0] * b[1][..., None]).sum(1) / b[1].sum(1, keepdim=True)
        return ma @ mb.t()


class _Wrap:
    def __init__(self, enc):
        self.enc = enc

    def to(self, device):
        return self.enc


def _ragged(rng, n, size, dim=3, tuple_=False):
    out = []
    for s in range(0, n, size):
        b = min(size, n - s)
        width = int(rng.integers(2, 6))
        lengths = rng.integers(1, width + 1, size=b)
        mask = torch.arange(width)[None] < torch.as_tensor(lengths)[:, None]
        x = torch.as_tensor(rng.normal(size=(b, width, dim)), dtype=torch.float32) * mask[..., None]
        out.append(_Wrap((x, mask) if tuple_ else {"x": x, "mask": mask}))
    return out


def test_score_pairs_equals_the_full_matrix_and_take_pads():
    rng = np.random.default_rng(2)
    images, texts = _ragged(rng, 7, 3), _ragged(rng, 35, 8, tuple_=True)
    model = _Ragged()
    full = compute_sims(model, images, texts, progress=False)
    ie, te = encode(model.encode_image, images, "cpu"), encode(model.encode_text, texts, "cpu")
    pairs = np.array([[0, 0], [6, 34], [3, 10], [3, 11], [3, 30], [5, 2]])
    _Ragged.calls = 0
    got = score_pairs(model, ie, te, pairs)
    assert np.allclose(got, full[pairs[:, 0], pairs[:, 1]], atol=1e-6)
    assert _Ragged.calls == 4          # grouped by image (4 distinct) rather than caption (6)
    enc = take(te, np.array([0, 8, 16, 24, 32, 35]), [33, 2, 17])     # three batches, any order
    assert enc[0].shape[0] == 3 and enc[1][0].tolist() == te[4][1][1].tolist() + [False] * (
        enc[1].shape[1] - te[4][1].shape[1])


def test_eccv_and_cxc_read_each_direction_from_its_own_matrix(monkeypatch):
    rng = np.random.default_rng(4)
    images, captions = np.arange(100, 104), np.arange(200, 220)
    ann = Annotations("eccv", images, captions, {100: [200, 201, 205], 102: [210, 211]},
                      {200: [100], 212: [102, 103], 219: [103]}, "test")
    a, b = rng.random((4, 20)), rng.random((4, 20))
    for fn in (protocols.eccv, protocols.cxc):
        both = fn(a, images, captions, annotations=ann, t2i_sims=b)
        only_a, only_b = fn(a, images, captions, annotations=ann), fn(b, images, captions, annotations=ann)
        for key, v in both.items():
            if key.startswith("i2t_"):
                assert v == only_a[key]
            elif key.startswith("t2i_"):
                assert v == only_b[key]
        assert fn(a, images, captions, annotations=ann, t2i_sims=a) == only_a
    # through the protocol registry, as evaluate.py --protocol eccv --shortlist calls it
    monkeypatch.setattr(protocols, "load_annotations", lambda name: ann)
    via = evaluate_protocol(a, "eccv", image_ids=images, caption_ids=captions, t2i_sims=b)
    assert via == protocols.eccv(a, images, captions, annotations=ann, t2i_sims=b)


# ---------------------------------------------------------------------------------------------
# evaluate.py and train.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny synthetic dataset with a vsepp run (the shortlister) and a resg run (cross-attention)."""
    from training.synthetic import make_dataset
    root = tmp_path_factory.mktemp("sl")
    make_dataset(root / "data", splits={"train": 24, "val": 8, "test": 8})
    small = ["--dataset", "synth", "--root", str(root / "data"), "--epochs", "1", "--batch-size", "20",
             "--workers", "0", "--set", "embed_dim=32", "--set", "word_dim=16"]
    for model in ("vsepp", "resg"):
        assert train.main(["--model", model, "--out", str(root / model), *small]) == 0
    return root


def run_eval(*args):
    return evaluate.main([*map(str, args), "--workers", "0"])


def test_evaluate_with_a_shortlist(runs, capsys):
    resg, vsepp = runs / "resg", runs / "vsepp"
    assert run_eval(resg, "--hard-negatives") == 0
    full = json.loads((resg / "eval.json").read_text())
    before = (resg / "eval.json").read_bytes()
    assert run_eval(resg, "--shortlist", vsepp, "--topk", 3, "--hard-negatives") == 0
    out = capsys.readouterr().out
    assert f"shortlist: {vsepp} top 3 of each query, re-scored by resg" in out
    res = json.loads((resg / "eval.json").read_text())
    key = f"test/f30k-1k shortlist={vsepp}@3"
    assert {k: res[k] for k in full} == full                   # the full results stay as they were
    info = res[key]["shortlist"]
    assert info["k"] == 3 and info["all_pairs"] == 8 * 40 and 40 * 3 <= info["pairs"] < 8 * 40
    assert info["seconds"] > 0 and set(info["recall_at_k"]) == {"i2t", "t2i"}
    assert f"test/hard_negatives shortlist={vsepp}@3" in res
    # every candidate re-scored: the same metrics as full scoring
    assert run_eval(resg, "--shortlist", vsepp, "--topk", 40, "--hard-negatives") == 0
    res = json.loads((resg / "eval.json").read_text())
    every = res[f"test/f30k-1k shortlist={vsepp}@40"]
    assert {k: every[k] for k in full["test/f30k-1k"]} == full["test/f30k-1k"]
    assert {k: v for k, v in res[f"test/hard_negatives shortlist={vsepp}@40"].items()
            if k != "shortlist"} == full["test/hard_negatives"]
    assert run_eval(resg, "--shortlist", vsepp, "--topk", 3, "--fuse", 0.5) == 0
    assert f"test/f30k-1k shortlist={vsepp}@3 fuse=0.5" in json.loads((resg / "eval.json").read_text())
    # without a shortlist the file is rewritten with byte-identical results for the full keys
    assert run_eval(resg, "--hard-negatives") == 0
    res = json.loads((resg / "eval.json").read_text())
    assert json.dumps({k: res[k] for k in full}) == json.dumps(json.loads(before))


def test_evaluate_shortlist_usage_and_bad_shortlisters(runs, capsys):
    resg, vsepp = runs / "resg", runs / "vsepp"
    for bad in (["--fuse", "0.5"], ["--shortlist", vsepp, "--fuse", "2"],
                ["--shortlist", vsepp, "--topk", "0"]):
        with pytest.raises(SystemExit) as e:
            run_eval(resg, *bad)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="cross-attention model; the shortlist must come from a two-tower"):
        run_eval(vsepp, "--shortlist", resg)
    assert run_eval(resg, "--shortlist", vsepp, "--save-sims") == 0
    assert "skipped --save-sims: a shortlisted evaluation" in capsys.readouterr().err
    assert not (resg / "sims-test.npz").exists()


def test_validation_with_a_shortlist(runs, tmp_path, capsys):
    """train.py --set val_shortlist=RUN2 --set val_topk=K: with K covering every caption the
    validation metrics equal full validation's; with a small K they come from the shortlist."""
    small = ["--model", "resg", "--dataset", "synth", "--root", str(runs / "data"), "--epochs", "1",
             "--batch-size", "20", "--workers", "0", "--set", "embed_dim=32", "--set", "word_dim=16"]
    rows = lambda d: (d / "metrics.csv").read_text().splitlines()   # noqa: E731
    assert train.main([*small, "--out", str(tmp_path / "all"), "--set", f"val_shortlist={runs / 'vsepp'}",
                       "--set", "val_topk=40"]) == 0
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    assert config["val_shortlist"] == str((runs / "vsepp").absolute()) and config["val_topk"] == 40
    assert "val_shortlist" not in config["model_config"]
    full = rows(runs / "resg")
    # every column but the two times
    assert [r.split(",")[:-2] for r in rows(tmp_path / "all")] == [r.split(",")[:-2] for r in full]
    assert train.main([*small, "--out", str(tmp_path / "k2"), "--set", f"val_shortlist={runs / 'vsepp'}",
                       "--set", "val_topk=2"]) == 0
    assert len(rows(tmp_path / "k2")) == 2
    assert f"train: validation re-scores the top 2 of {(runs / 'vsepp').absolute()}: " in capsys.readouterr().err
    for bad in ("val_topk=x", "val_topk=0"):   # a usage error: exit 2 naming the setting
        with pytest.raises(SystemExit) as e:
            train.main([*small, "--out", str(tmp_path / "bad"), "--set", bad])
        assert e.value.code == 2
        assert "val_topk" in capsys.readouterr().err
    # --resume keeps the run's settings: another val_topk is a usage error naming it
    with pytest.raises(SystemExit) as e:
        train.main([*small, "--out", str(tmp_path / "k2"), "--resume", "--set", "val_topk=3"])
    assert e.value.code == 2 and "val_topk (2 saved, 3 given)" in capsys.readouterr().err


def _torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(REPO / "training" / "evaluate.py"), *map(str, args), "--workers", "0"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_each_process_scores_its_share_and_the_first_gets_everything(monkeypatch):
    """The split over processes without processes: rank 1's share is handed to rank 0's gather."""
    from training import evaluation
    rng = np.random.default_rng(5)
    images, texts = _ragged(rng, 7, 2), _ragged(rng, 35, 6, tuple_=True)
    model = _Ragged()
    full = compute_sims(model, images, texts, progress=False)
    ie, te = encode(model.encode_image, images, "cpu"), encode(model.encode_text, texts, "cpu")
    pairs = Shortlist.from_sims(rng.random((7, 35)), 4).pairs
    shares = {}

    def gather(part, rank, world):   # rank 1 runs first and leaves its part for rank 0
        shares[rank] = part
        return part + shares[1] if rank == 0 else None
    monkeypatch.setattr(evaluation, "gather_to_first", gather)
    _Ragged.calls = 0
    assert compute_sims(model, images, texts, progress=False, rank=1, world=2) is None
    assert 0 < _Ragged.calls < 4 * 6                        # about half of the 4 x 6 blocks
    assert np.array_equal(compute_sims(model, images, texts, progress=False, rank=0, world=2), full)
    import training.shortlist as mod
    monkeypatch.setattr(mod, "gather_to_first", evaluation.gather_to_first)
    shares.clear()
    assert score_pairs(model, ie, te, pairs, rank=1, world=2) is None
    got = score_pairs(model, ie, te, pairs, rank=0, world=2)
    assert np.allclose(got, full[pairs[:, 0], pairs[:, 1]], atol=1e-6)


@pytest.mark.slow
def test_two_processes_score_the_same_matrix_and_shortlist_as_one(runs, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU): the blocks (4 image x 4 caption batches) or the
    shortlisted pairs are split over the processes and gathered on the first: the same numbers
    as one process, one summary line."""
    resg, vsepp = runs / "resg", runs / "vsepp"
    small = ["--batch-size", "2", "--save-sims"]
    assert run_eval(resg, *small) == 0
    one = evaluate.load_sims(evaluate.sims_path(resg, "test"))["sims"]
    out = _torchrun(resg, *small)
    assert out.count("evaluate: ") == 1
    assert np.array_equal(evaluate.load_sims(evaluate.sims_path(resg, "test"))["sims"], one)
    key = f"test/f30k-1k shortlist={vsepp}@3"
    assert run_eval(resg, "--batch-size", "2", "--shortlist", vsepp, "--topk", 3) == 0
    single = json.loads((resg / "eval.json").read_text())[key]
    _torchrun(resg, "--batch-size", "2", "--shortlist", vsepp, "--topk", 3)
    double = json.loads((resg / "eval.json").read_text())[key]
    for entry in (single, double):
        for k in ("seconds", "shortlist_seconds", "rerank_seconds"):
            entry["shortlist"].pop(k)
    assert double == single


def test_rerank_benchmark_cells_resume_and_a_stopped_training(runs, tmp_path, capsys):
    """benchmarks/rerank.py: a run stopped before its last epoch is trained to the end first;
    re-scoring every candidate (K = 40 captions, 8 images) equals full scoring, with the
    shortlist's recall@K at 100 %; a second call measures nothing again."""
    import shutil

    from benchmarks import rerank as bench
    shutil.copytree(runs / "vsepp", tmp_path / "vsepp")
    small = ["--dataset", "synth", "--root", str(runs / "data"), "--epochs", "2", "--batch-size", "20",
             "--workers", "0", "--set", "embed_dim=32", "--set", "word_dim=16"]
    assert train.main(["--model", "resg", "--out", str(tmp_path / "resg"), *small, "--stop-after", "1"]) == 0
    argv = ["--runs", str(tmp_path), "--models", "resg", "--shortlisters", "vsepp", "--topk", "2,40",
            "--fuse", "0.5"]
    assert bench.main(argv) == 0
    err = capsys.readouterr().err
    assert "rerank: resg: trained 1 of 2 epochs; resuming its training" in err
    assert len((tmp_path / "resg" / "metrics.csv").read_text().splitlines()) == 3   # header + 2 epochs
    results = json.loads((tmp_path / "rerank.json").read_text())
    full, every, two = results["resg/full"], results["resg/vsepp@40"], results["resg/vsepp@2"]
    assert every["metrics"]["rsum"] == pytest.approx(full["metrics"]["rsum"])
    assert results["resg/vsepp"]["recall_at_k"]["40"] == {"i2t": 100.0, "t2i": 100.0}
    assert two["pairs"] < every["pairs"] <= full["pairs"] == 8 * 40 and set(two["fused"]) == {"0.5"}
    before = (tmp_path / "rerank.json").read_bytes()
    assert bench.main(argv) == 0
    assert "rerank: resg:" not in capsys.readouterr().err
    assert (tmp_path / "rerank.json").read_bytes() == before
