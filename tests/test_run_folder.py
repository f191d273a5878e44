"""What a run folder can be trusted to hold: one writer at a time, every epoch's row committed
with its checkpoint, a full disk as one line, recalls of the weights they claim, and one-line
errors for a damaged FAISS cache and for `upgrade` of what is not a run. The commands run
in-process on the shared tiny run; a process that holds a run's claim stands in for a second
trainer."""

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from itmkit.cli import main as itmkit
from pipeline import shards
from training import checkpoint, evaluate, report, train

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
SMALL = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]

sys.path.insert(0, str(REPO / "benchmarks"))
import compare  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = itmkit([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def train_args(root, out, *extra) -> list:
    return ["train", "--model", "vsepp", "--dataset", "synth", "--root", root, "--out", out, *SMALL, *extra]


def copy_run(tiny_run, tmp_path) -> tuple[Path, Path]:
    root, src = tiny_run
    shutil.copytree(src, tmp_path / "run")
    return root, tmp_path / "run"


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    """Another process holding the run folder's claim, as a training ``itmkit train`` does."""
    code = ("import sys, time\nfrom pipeline import shards\nfrom pathlib import Path\n"
            "with shards.claim(Path(sys.argv[1]).resolve()):\n    print('held', flush=True)\n    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.kill()
        p.wait()


def files(run_dir: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(run_dir.iterdir()) if f.is_file()}


# ---------------------------------------------------------------------------------------------
# one writer per run folder

def test_a_second_train_of_one_run_folder_is_refused_naming_the_holder(tiny_run, tmp_path):
    root, run_dir = copy_run(tiny_run, tmp_path)
    before = files(run_dir)
    with held_by_another_process(run_dir) as pid:
        rc, out, err = cli(*train_args(root, run_dir, "--resume"))
    holder = f"host {socket.gethostname()}, pid {pid}"
    assert rc == 1 and err == (f"train: error: {run_dir}: another process is training this run ({holder}); "
                               "wait for it to end, or choose another --out\n")
    assert files(run_dir) == before                                   # nothing of it was touched
    rc, _, err = cli(*train_args(root, run_dir, "--resume"))   # once it is gone: fine
    assert rc == 0, err


def test_two_trains_started_together_on_one_folder_one_runs_one_is_refused(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "itmkit.cli", *map(str, train_args(root, out, "--epochs", "1",
                                                                                          "--seed", str(seed), "--threads", "1"))],
                              env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1)]
    done = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in done) == [0, 1], done
    refused = next(err for rc, err in done if rc == 1)
    assert "another process is training this run (host " in refused or "already holds a run" in refused
    assert "Traceback" not in refused
    seed = json.loads((out / "config.json").read_text())["seed"]
    winner = procs[[rc for rc, _ in done].index(0)]
    assert seed == [0, 1][procs.index(winner)]                      # config.json of the one that ran
    with open(out / "metrics.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]


def test_evaluate_of_a_run_in_training_says_which_epoch_it_scores(tiny_run, tmp_path):
    root, run_dir = copy_run(tiny_run, tmp_path)
    with held_by_another_process(run_dir) as pid:
        rc, out, err = cli("evaluate", run_dir, "--workers", "0")
        assert rc == 0, err
        assert (f"evaluate: {run_dir} is being trained (host {socket.gethostname()}, pid {pid}): "
                "scoring its best.pt of epoch 1 of 1, the last finished one") in err
        entry = json.loads((run_dir / "eval.json").read_text())["test/f30k-1k"]
        assert entry["checkpoint"] == {"file": "best.pt", "sha256": shards.sha256_file(run_dir / "best.pt"),
                                       "epoch": 1}
        (run_dir / "best.pt").unlink()
        rc, _, err = cli("evaluate", run_dir, "--workers", "0")
        assert rc == 1 and err == (f"evaluate: error: {run_dir}: being trained (host "
                                   f"{socket.gethostname()}, pid {pid}) and has no finished best.pt "
                                   "yet; evaluate it after its first epoch\n")
