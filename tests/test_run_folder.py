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
from pathlib import Path

import pytest
import torch

from itmkit.cli import main as itmkit
from pipeline import shards
from training import checkpoint, train
from training.run import load_run

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))
SMALL = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]

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


@pytest.mark.slow
def test_two_trains_started_together_on_one_folder_one_runs_one_is_refused(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "run"
    cmd = lambda seed: [sys.executable, "-m", "itmkit.cli",  # noqa: E731
                        *map(str, train_args(root, out, "--epochs", "1", "--seed", seed, "--threads", "1"))]
    procs = [subprocess.Popen(cmd(seed), env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


# ---------------------------------------------------------------------------------------------
# a full disk

class FullDisk(io.FileIO):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path, mode="rb", room: int = 0):
        super().__init__(path, mode)
        self.room = room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(b)
        return super().write(b)


def test_full_disk_while_saving_a_checkpoint_is_one_line(tiny_run, tmp_path, monkeypatch):
    """torch.save meets the full disk through its file object and raises its own RuntimeError
    ("unexpected pos"); train ends with one line naming the file, the files before intact."""
    root, _ = tiny_run
    out = tmp_path / "run"
    assert cli(*train_args(root, out, "--epochs", "2", "--stop-after", "1"))[0] == 0
    before = files(out)
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, "wb", room=4096), raising=False)
    with pytest.raises(RuntimeError, match="unexpected pos"), FullDisk(tmp_path / "x.pt", "wb", room=4096) as f:
        torch.save({"w": torch.zeros(10_000)}, f)                  # what torch itself says
    rc, _, err = cli(*train_args(root, out, "--resume"))
    written = "best.pt" if "best.pt" in err else "last.pt"
    assert rc == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"train: error: {out / written}: no space left on device (nothing was "
                                    "written under this name; free some space and rerun)")
    assert files(out) == before and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_full_disk_in_evaluate_and_report_is_one_line(tiny_run, tmp_path, monkeypatch, command):
    root, run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / "eval.json").write_text("{}\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.atomic.os, "fsync", no_space)
    rc, _, err = cli(command, run_dir, "--workers", "0")
    name = "eval.json" if command == "evaluate" else "report.html"
    assert rc == 1 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"{command}: error: {run_dir / name}: no space left on device")
    assert (run_dir / "eval.json").read_text() == "{}\n" and not (run_dir / "report.html").exists()


# ---------------------------------------------------------------------------------------------
# recalls of the weights they claim

def test_report_and_compare_leave_out_recalls_of_other_weights(tiny_run, tmp_path):
    """evaluate after epoch 1, train on: the report recomputes (saying so) what eval.json and
    the saved similarities hold of epoch 1's weights, and compare evaluates again."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import compare
    root, _ = tiny_run
    out = tmp_path / "run"
    assert cli(*train_args(root, out, "--epochs", "2", "--stop-after", "1"))[0] == 0
    assert cli("evaluate", out, "--checkpoint", "last", "--save-sims", "--workers", "0")[0] == 0
    assert compare.not_current(out, "test/f30k-1k") in ("", "its eval.json entry test/f30k-1k scored last.pt "
                                                            "of epoch 1, not its best.pt as it is now")
    first = json.loads((out / "eval.json").read_text())["test/f30k-1k"]
    assert first["checkpoint"]["epoch"] == 1
    assert cli(*train_args(root, out, "--resume"))[0] == 0

    page = tmp_path / "r.html"
    assert cli("report", out, "--checkpoint", "last", "--out", page, "--workers", "0")[0] == 0
    text = page.read_text()
    assert ("computed for this report (eval.json: left out f30k-1k: scored last.pt of epoch 1, not the "
            "last.pt of epoch 2 loaded here)") in text
    assert "computed from last.pt (sims-test.npz holds the similarities of other weights)" in text
    shown = re.search(r'<tr class="recall">.*?</tr>', text).group(0)
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh)
    for f in ("eval.json", "sims-test.npz"):
        (fresh / f).unlink()
    assert cli("evaluate", fresh, "--checkpoint", "last", "--workers", "0")[0] == 0
    now = json.loads((fresh / "eval.json").read_text())["test/f30k-1k"]
    assert now["checkpoint"]["epoch"] == 2 and now["checkpoint"]["sha256"] != first["checkpoint"]["sha256"]
    assert f"{now['rsum']:.1f} <span" in shown

    # compare: an entry of best.pt as it was is current; once best.pt is other weights it is not
    assert cli("evaluate", out, "--workers", "0")[0] == 0
    assert compare.not_current(out, "test/f30k-1k") == ""
    ckpt = checkpoint.load(out / "best.pt")
    checkpoint.save(out / "best.pt", {k: v for k, v in ckpt.items() if k not in ("format", "sha256")}
                    | {"step": ckpt["step"] + 1})
    assert compare.not_current(out, "test/f30k-1k") == (
        f"its eval.json entry test/f30k-1k scored best.pt of epoch {ckpt['epoch'] + 1}, not its best.pt as it is now")


# ---------------------------------------------------------------------------------------------
# an epoch's row and its checkpoint are committed together

class Killed(BaseException):
    """A stop between two writes (as SIGKILL would, no handler runs)."""


def test_a_stop_between_last_pt_and_metrics_csv_loses_no_row(tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    assert cli(*train_args(root, tmp_path / "whole", "--epochs", "2"))[0] == 0
    out = tmp_path / "run"
    real = train.append_metrics

    def killed_at_the_last_epoch(path, row):
        if row["epoch"] == 2:
            raise Killed
        real(path, row)

    monkeypatch.setattr(train, "append_metrics", killed_at_the_last_epoch)
    with pytest.raises(Killed):
        cli(*train_args(root, out, "--epochs", "2"))
    monkeypatch.undo()
    assert checkpoint.load(out / "last.pt")["epoch"] == 1                      # last.pt of epoch 2 is saved
    assert len((out / "metrics.csv").read_text().splitlines()) == 2             # its row is not
    rc, stdout, err = cli(*train_args(root, out, "--resume"))
    assert rc == 0 and "nothing to do" in stdout
    assert "restored the metrics.csv row of epoch 2 from last.pt" in err
    rows = lambda d: [ln.split(",")[:-2] for ln in (d / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert rows(out) == rows(tmp_path / "whole")                                # all but the seconds
    assert cli(*train_args(root, out, "--resume"))[2].count("restored") == 0   # said once


# ---------------------------------------------------------------------------------------------
# a damaged FAISS cache; upgrade of what is not a run

def test_a_truncated_faiss_cache_is_rebuilt_saying_so(tiny_run, tmp_path):
    root, run_dir = copy_run(tiny_run, tmp_path)
    caption = int(load_run(run_dir, root, split="test").data.text.caption_ids[0])
    query = ["retrieve", run_dir, "--caption-id", caption, "-k", 3, "--index", "hnsw", "--quiet"]
    rc, first, err = cli(*query)
    assert rc == 0, err
    cache = run_dir / "index-test" / "faiss-images-hnsw.index"
    cache.write_bytes(cache.read_bytes()[:len(cache.read_bytes()) // 2])
    rc, again, err = cli(*query)
    assert rc == 0 and "Traceback" not in err
    assert err == ("retrieve: note: rebuilt and cached faiss-images-hnsw.index (the cached one could not be "
                   "read: truncated or damaged)\n")
    assert again.splitlines()[:-1] == first.splitlines()[:-1]
    assert cli(*query)[2] == ""                                                # the rebuilt cache is read


def test_upgrade_of_what_is_not_a_run_is_one_line(tiny_run, tmp_path):
    root, _ = tiny_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hi there, this is not a checkpoint\n")
    cases = {tmp_path / "empty": "not a run folder (no best.pt or last.pt in it)",
             root / "synth": "not a run folder (no best.pt or last.pt in it)",
             tmp_path / "notes.txt": "not a checkpoint (not a file torch.save writes)",
             tmp_path / "gone": "no such file or folder"}
    for path, why in cases.items():
        rc, out, err = cli("upgrade", path)
        assert (rc, out, err) == (1, "", f"upgrade: error: {path}: {why}\n")
    assert (tmp_path / "notes.txt").read_text() == "hi there, this is not a checkpoint\n"


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")   # its thread's traceback
def test_full_disk_in_tensorboards_writer_thread_is_one_line(tiny_run, tmp_path, monkeypatch):
    from tensorboard.summary.writer import record_writer

    root, _ = tiny_run
    out = tmp_path / "run"

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", no_space)   # runs in the writer's thread
    rc, _, err = cli(*train_args(root, out, "--epochs", "1", "--quiet"))
    assert rc == 1 and "Traceback" not in err and "Exception in thread" not in err, err
    assert err.splitlines()[-1] == (f"train: error: {out / 'tb'}: no space left on device while writing "
                                    "TensorBoard's log; the checkpoints and metrics.csv are those of the last "
                                    "finished epoch")
