"""benchmarks/compare.py: the mean ± std table, and several seeds end to end."""

import json
import statistics
import sys
from pathlib import Path

import pytest

from training.synthetic import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import compare  # noqa: E402


def test_table_gives_mean_and_sample_std_per_figure():
    runs = [{"train_s": 10, "eval_s": 1, "best_val_rsum": 100.0, "rsum": 90.0, "i2t_r1": 10.0,
             "i2t_r5": 20.0, "i2t_r10": 30.0, "t2i_r1": 5.0, "t2i_r5": 10.0, "t2i_r10": 15.0,
             "attribute_i2t_acc": 50.0, "attribute_t2i_acc": 60.0},
            {"train_s": 12, "eval_s": 1, "best_val_rsum": 110.0, "rsum": 96.0, "i2t_r1": 14.0,
             "i2t_r5": 20.0, "i2t_r10": 30.0, "t2i_r1": 7.0, "t2i_r5": 10.0, "t2i_r10": 15.0,
             "attribute_i2t_acc": 54.0, "attribute_t2i_acc": 60.0}]
    head, _, row = compare.table({"vsepp": runs})
    cells = dict(zip(head.strip("|").split(" | "), row.strip("|").split(" | ")))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells["seeds"] == "2"
    assert cells["test rSum"] == f"93.0 ± {statistics.stdev([90.0, 96.0]):.1f}" == "93.0 ± 4.2"
    assert cells["i2t R@1"] == "12.0 ± 2.8" and cells["t2i R@5"] == "10.0 ± 0.0"
    assert cells["attribute i2t %"] == "52.0 ± 2.8" and cells["attribute t2i %"] == "60.0 ± 0.0"
    _, _, one = compare.table({"vsepp": runs[:1]})
    assert "| 90.0 |" in one and "±" not in one


@pytest.mark.slow
def test_two_seeds_end_to_end(tmp_path, capsys):
    make_dataset(tmp_path / "data", splits={"train": 20, "val": 6, "test": 6})
    args = ["--dataset", "synth", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "cmp"),
            "--models", "vsepp", "--epochs", "1", "--batch-size", "10", "--seeds", "2",
            "--set", "embed_dim=16", "--set", "word_dim=8"]
    assert compare.main(args) == 0
    out = capsys.readouterr().out
    assert "seeds 0..1 (mean ± std)" in out and "| vsepp | 2 |" in out
    runs = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]["vsepp"]
    assert len(runs) == 2
    assert {p.name for p in (tmp_path / "cmp").iterdir() if p.is_dir()} == {"vsepp-seed0", "vsepp-seed1"}
    for seed in (0, 1):
        assert json.loads((tmp_path / "cmp" / f"vsepp-seed{seed}" / "config.json").read_text())["seed"] == seed
    assert compare.main(args) == 0                                   # evaluated runs are reused
    assert "training vsepp" not in capsys.readouterr().err
