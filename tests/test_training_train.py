"""train.py end to end on a tiny synthetic dataset: resume is exact, DDP on CPU, bad input,
evaluate and plot, and the baseline learns."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import shards
from training import checkpoint
from training.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
TRAIN, EVALUATE, PLOT = (str(REPO / "training" / f) for f in ("train.py", "evaluate.py", "plot.py"))
SMALL = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, splits={"train": 24, "val": 8, "test": 8})
    return root


def run(script, *args, check=True, env=None):
    p = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=REPO)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


def train(root, out, *extra, check=True):
    return run(TRAIN, "--model", "vsepp", "--dataset", "synth", "--root", root, "--out", out,
               *SMALL, *extra, check=check)


def test_resume_gives_identical_results(root, tmp_path):
    train(root, tmp_path / "full", "--epochs", "2")
    train(root, tmp_path / "split", "--epochs", "2", "--stop-after", "1")
    assert checkpoint.load(tmp_path / "split" / "last.pt")["epoch"] == 0
    p = train(root, tmp_path / "split", "--resume")
    assert "1 epoch(s) run (1 done before)" in p.stdout
    a = checkpoint.load(tmp_path / "full" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    lines = lambda d: [ln.split(",")[:-1] for ln in (d / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "full") == lines(tmp_path / "split")   # all but the seconds column
    assert any((tmp_path / "full" / "tb").iterdir())


def test_evaluate_save_sims_ensemble_hard_negatives_and_plot(root, tmp_path):
    out = tmp_path / "r"
    train(root, out, "--epochs", "1")
    p = run(EVALUATE, out, "--root", root, "--save-sims", "--hard-negatives", "--workers", "0",
            "--protocol", "f30k-1k", "--protocol", "coco-1k", "--fold-size", "4")
    assert "f30k-1k (test, 8 images)" in p.stdout and "hard negatives [attribute] 4 pairs" in p.stdout
    res = json.loads((out / "eval.json").read_text())
    assert res["test/coco-1k"]["folds"] == 2 and 0 <= res["test/f30k-1k"]["rsum"] <= 600
    p = run(EVALUATE, "--ensemble", out, out, "--root", root, "--protocol", "f30k-1k")
    assert f"rSum {res['test/f30k-1k']['rsum']:.1f}" in p.stdout   # mean of a run with itself
    run(PLOT, out)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_refused_and_nothing_is_overwritten(root, tmp_path):
    out = tmp_path / "r"
    train(root, out, "--epochs", "1")
    before = {f: (out / f).read_bytes() for f in ("config.json", "last.pt", "metrics.csv")}
    p = train(root, out, "--epochs", "1", check=False)
    assert p.returncode == 1 and "already holds a run" in p.stderr
    p = run(TRAIN, "--model", "vsepp", "--dataset", "other", "--root", root, "--out", out, "--resume",
            check=False)
    assert p.returncode == 1 and "run dir of dataset 'synth'" in p.stderr
    cfg = json.loads((out / "config.json").read_text())
    ck = checkpoint.load(out / "last.pt")

    # a checkpoint from another model / vocabulary
    ck["meta"]["model"] = "resg"
    checkpoint.save(out / "best.pt", ck)
    p = run(EVALUATE, out, "--root", root, "--workers", "0", check=False)
    assert p.returncode == 1 and "checkpoint of model 'resg'" in p.stderr
    ck["meta"]["model"], ck["meta"]["vocab_fingerprint"] = "vsepp", "0" * 16
    checkpoint.save(out / "best.pt", ck)
    p = run(EVALUATE, out, "--root", root, "--workers", "0", check=False)
    assert p.returncode == 1 and "another vocabulary" in p.stderr

    # shards rebuilt with another config: resume and evaluation refuse them
    cfg["shard_hashes"]["regions"] = "0123456789abcdef"
    shards.write_json(out / "config.json", cfg)
    before["config.json"] = (out / "config.json").read_bytes()
    p = train(root, out, "--resume", check=False)
    assert p.returncode == 1 and "expects regions shards of config 0123456789abcdef" in p.stderr
    p = run(EVALUATE, out, "--root", root, "--checkpoint", "last", "--workers", "0", check=False)
    assert p.returncode == 1 and "expects regions shards" in p.stderr
    assert before == {f: (out / f).read_bytes() for f in before}

    p = run(TRAIN, "--model", "nope", "--dataset", "synth", "--out", out, check=False)
    assert p.returncode == 2 and "vsepp" in p.stderr


def test_ddp_two_processes_gloo(root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", TRAIN, "--model", "vsepp", "--dataset", "synth",
                        "--root", str(root), "--out", str(tmp_path / "ddp"), *SMALL, "--epochs", "1"],
                       capture_output=True, text=True, env=env, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert ck["step"] == 120 // 20   # 2 ranks x 10 pairs per step: 120 pairs -> 6 steps
    assert p.stdout.count("train: vsepp") == 1   # one summary, from rank 0


def test_baseline_learns_on_synthetic_data(tmp_path):
    """Features depend on the caption words (training.synthetic): vsepp must beat chance by far.
    Chance rSum on 50 test images is about 60 (random scores, measured)."""
    make_dataset(tmp_path / "data", splits={"train": 120, "val": 50, "test": 50}, seed=1)
    train(tmp_path / "data", tmp_path / "r", "--epochs", "3", "--set", "embed_dim=64",
          "--batch-size", "50")
    p = run(EVALUATE, tmp_path / "r", "--root", tmp_path / "data", "--workers", "0")
    rsum = json.loads((tmp_path / "r" / "eval.json").read_text())["test/f30k-1k"]["rsum"]
    assert rsum > 300, p.stdout
