"""benchmarks/train_speed.py: it reuses a data root that holds the demo dataset and prints one row
per model with the pairs of an epoch and its rates; a model that cannot train is a row saying why."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_rows_per_model_on_a_reused_demo_root(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, "demo", {"train": 8, "val": 4, "test": 4}, grid_hw=(2, 2))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--root", str(root),
                        "--out", str(tmp_path / "runs"), "--models", "vsepp,dsrln", "--epochs", "2",
                        "--max-images", "8", "--set", "embed_dim=32", "--set", "word_dim=16"],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"demo data: {root / 'demo'} (reused)" in r.stdout
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines()
            if re.match(r"\| (vsepp|dsrln) ", line)}
    assert set(rows) == {"vsepp", "dsrln"}
    # the demo's batch of 16 from config/config.yaml: 40 pairs make 2 full batches = 32 pairs
    cells = [c.strip() for c in rows["vsepp"].split("|")[1:-1]]
    assert cells[1] == "32" and float(cells[2]) > 0 and float(cells[3]) > 0, rows["vsepp"]
    assert (tmp_path / "runs" / "vsepp" / "metrics.csv").read_text().count("\n") == 3   # header + 2 epochs
    assert "failed" not in rows["dsrln"], rows["dsrln"]
