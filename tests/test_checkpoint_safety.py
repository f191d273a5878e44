"""Reading a run never runs code from it. Crafted files whose pickle calls ``os.system`` (it
creates a marker file) are refused, with nothing run, by every path that reads a run folder:
evaluate, train --resume, export, load_run, the ensemble's saved similarities, an exported index
and checkpoint upgrade. Checkpoints that train.py writes load with plain
``torch.load(weights_only=True)``; those of the earlier format are refused with the command that
converts them, and the conversion runs no code either."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint, evaluate, export, train
from training.checkpoint import CheckpointError
from training.run import load_run

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this calls os.system (it touches ``marker``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the trained run (the tests alter its files)."""
    root, src = tiny_run
    out = tmp_path / "run"
    out.mkdir()
    for f in ("config.json", "best.pt", "last.pt", "metrics.csv"):
        (out / f).write_bytes((src / f).read_bytes())
    return root, out


def craft(path: Path, marker: Path, zip_format: bool = True) -> None:
    """Replace ``path`` (a real checkpoint) by the same content plus a payload, written with
    plain torch.save as an attacker would; check the payload does run when unpickled freely."""
    ckpt = checkpoint.load(path)
    ckpt["meta"]["note"] = Payload(marker)
    torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
    torch.load(path, weights_only=False)           # the file is live: this is what must never happen
    assert marker.exists()
    marker.unlink()


def old_format(path: Path) -> dict:
    """Rewrite last.pt as the earlier version wrote checkpoints: numpy RNG state, no format key."""
    ckpt = checkpoint.load(path)
    del ckpt["format"]
    ckpt["rng"]["numpy"], ckpt["rng"]["python"] = np.random.get_state(), random.getstate()
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_crafted_checkpoint_is_refused_by_the_loader(run, tmp_path, zip_format):
    _, out = run
    marker = tmp_path / "ran"
    craft(out / "best.pt", marker, zip_format)
    with pytest.raises(CheckpointError, match="refused") as e:
        checkpoint.load(out / "best.pt")
    assert not marker.exists()
    assert "\n" not in str(e.value)
    if zip_format:   # the static scan names what the file would have called
        assert "os.system" in str(e.value) or "posix.system" in str(e.value)


def test_truncated_checkpoint_is_named_in_one_line(run):
    _, out = run
    data = (out / "best.pt").read_bytes()
    (out / "best.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"best.pt: cannot read checkpoint \(truncated or corrupt\?\)") as e:
        load_run(out)
    assert "\n" not in str(e.value)


def test_crafted_checkpoint_is_refused_by_every_command(run, tmp_path):
    root, out = run
    marker = tmp_path / "ran"
    craft(out / "best.pt", marker)
    craft(out / "last.pt", marker)
    attempts = {
        "load_run": lambda: load_run(out),
        "evaluate": lambda: evaluate.main([str(out), "--workers", "0"]),
        "evaluate --checkpoint last": lambda: evaluate.main([str(out), "--workers", "0", "--checkpoint", "last"]),
        "export": lambda: evaluate.main([str(out), "--workers", "0", "--export-index", str(tmp_path / "idx")]),
        "train --resume": lambda: train.main(["--model", "vsepp", "--dataset", "synth", "--out", str(out),
                                              "--resume", *SMALL]),
        "upgrade": lambda: checkpoint.main(["upgrade", str(out)]),
    }
    for name, attempt in attempts.items():
        with pytest.raises(CheckpointError, match="refused"):
            attempt()
        assert not marker.exists(), name
    assert not (tmp_path / "idx").exists()


def test_cli_refuses_with_one_line_and_exit_1(run, tmp_path):
    root, out = run
    marker = tmp_path / "ran"
    craft(out / "best.pt", marker)
    p = subprocess.run([sys.executable, str(REPO / "training" / "evaluate.py"), str(out), "--workers", "0"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == 1 and not marker.exists()
    assert p.stderr.startswith("evaluate: error:") and p.stderr.count("\n") == 1, p.stderr


def test_saved_similarities_and_exported_index_hold_plain_arrays_only(run, tmp_path):
    root, out = run
    marker = tmp_path / "ran"
    payload = np.array([Payload(marker)], dtype=object)
    np.savez(evaluate.sims_path(out, "test"), sims=payload, image_ids=np.arange(1), caption_ids=np.arange(5),
             dataset="synth", shard_hashes="")
    with pytest.raises(CheckpointError, match="refused"):
        evaluate.main(["--ensemble", str(out), str(out)])
    assert not marker.exists()

    idx = tmp_path / "idx"
    assert evaluate.main([str(out), "--workers", "0", "--export-index", str(idx)]) == 0
    assert export.read_index(idx)["images"].shape == (8, 32)
    np.save(idx / "captions.npy", payload)
    with pytest.raises(CheckpointError, match="captions.npy: refused"):
        export.read_index(idx)
    assert not marker.exists()


def test_written_checkpoints_load_weights_only_and_best_holds_inference_only(run):
    _, out = run
    best = torch.load(out / "best.pt", weights_only=True)
    last = torch.load(out / "last.pt", weights_only=True)
    assert {"optimizer", "scaler", "rng"}.isdisjoint(best) and {"optimizer", "scaler", "rng"} <= set(last)
    for ck in (best, last):
        assert {"model", "meta", "config", "format", "epoch"} <= set(ck)
        assert set(ck["meta"]) >= {"model", "vocab_fingerprint", "shard_hashes"}
        assert ck["config"]["model_config"]["embed_dim"] == 32          # the whole run config, plain
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())   # 1 epoch: same weights
    assert (out / "best.pt").stat().st_size < (out / "last.pt").stat().st_size / 2   # Adam: 2 moments


def test_save_refuses_what_weights_only_loading_would_refuse(tmp_path):
    for bad in ({"x": np.zeros(3)}, {"x": np.float64(1.0)}, {"x": Path("a")}, {("a", 1): 1}):
        with pytest.raises(TypeError, match="not plain data"):
            checkpoint.save(tmp_path / "c.pt", bad)
    assert not (tmp_path / "c.pt").exists()


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.normal()   # a cached gaussian in numpy's state
    checkpoint.save(tmp_path / "c.pt", {"rng": checkpoint.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.normal())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_earlier_format_is_refused_with_the_command_that_converts_it(run, capsys):
    root, out = run
    evaluate.main([str(out), "--workers", "0"])
    before = capsys.readouterr().out.splitlines()[0]
    last = old_format(out / "last.pt")
    (out / "best.pt").write_bytes((out / "last.pt").read_bytes())    # as the earlier version saved it
    with pytest.raises(CheckpointError, match=r"earlier itmkit version.*`itmkit upgrade "):
        evaluate.main([str(out), "--workers", "0"])
    assert checkpoint.main(["upgrade", str(out)]) == 0
    assert "optimizer" not in checkpoint.load(out / "best.pt")        # best.pt keeps inference only
    evaluate.main([str(out), "--workers", "0"])
    assert before in capsys.readouterr().out                          # the same scores as before
    up = checkpoint.load(out / "last.pt")
    assert np.array_equal(up["rng"]["numpy"]["keys"].numpy(), last["rng"]["numpy"][1])
    assert train.main(["--model", "vsepp", "--dataset", "synth", "--out", str(out), "--resume",
                       *SMALL]) == 0                                     # and resumes
