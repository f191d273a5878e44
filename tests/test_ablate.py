"""benchmarks/ablate.py: the statistics on hand-computed numbers, the cells table against the
model configs, and two seeds of two cells end to end."""

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from training import models
from training.config import parse_overrides
from training.synthetic import make_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ablate  # noqa: E402


def test_statistics_on_hand_computed_numbers():
    # full: mean 200, s² = 16; cell: mean 192, s² = 4; σ = sqrt(16/3 + 4/3) = sqrt(20/3) = 2.582
    r = ablate.compare_to_full([196.0, 200.0, 204.0], [190.0, 192.0, 194.0])
    assert (r["n"], r["mean"], r["std"], r["diff"]) == (3, 192.0, 2.0, -8.0)
    assert r["se"] == pytest.approx(2.5820, abs=1e-4)
    assert r["verdict"] == "helps (> 2σ)"                     # -8 < -5.16
    r = ablate.compare_to_full([196.0, 200.0, 204.0], [201.0, 205.0, 209.0])
    assert r["diff"] == 5.0 and r["se"] == pytest.approx(math.sqrt(32 / 3))
    assert r["verdict"] == "no measurable difference"         # 5 < 2 x 3.27
    r = ablate.compare_to_full([199.0, 201.0], [209.0, 211.0])
    assert r["diff"] == 10.0 and r["se"] == pytest.approx(math.sqrt(2 / 2 + 2 / 2))
    assert r["verdict"] == "hurts (> 2σ)"                     # 10 > 2 x 1.41
    r = ablate.compare_to_full([200.0], [190.0])
    assert r["std"] is None and r["se"] is None and r["verdict"] == "one seed: no σ"


def test_figures_average_the_two_directions_of_each_hard_negative_kind():
    run = {"rsum": 100.0, "i2t_r1": 1.0, "attribute_i2t_acc": 60.0, "attribute_t2i_acc": 70.0,
           "relation_i2t_acc": 50.0, "relation_t2i_acc": 40.0}
    assert ablate.figures(run) == {"test rSum": 100.0, "attribute %": 65.0, "relation %": 45.0}


def test_every_cell_sets_fields_its_model_has_to_non_default_values():
    for name, cells in ablate.CELLS.items():
        cls = models.get(name).config_class
        assert len({c for c, _ in cells}) == len(cells) and ablate.FULL not in dict(cells)
        for cell, overrides in cells:
            values = parse_overrides(overrides, cls)
            defaults = dataclasses.asdict(cls())
            assert all(defaults[k] != v for k, v in values.items()), (name, cell, values)


def test_unknown_cell_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--model", "cimn", "--out", str(tmp_path), "--epochs", "1", "--batch-size", "2",
                     "--root", str(tmp_path), "--cells", "no-such-cell"])
    assert "unknown cell(s) ['no-such-cell'] of cimn" in capsys.readouterr().err


@pytest.mark.slow
def test_two_seeds_two_cells_end_to_end(tmp_path, capsys):
    make_dataset(tmp_path / "data", splits={"train": 20, "val": 6, "test": 6})
    out = tmp_path / "abl"
    args = ["--model", "cimn", "--cells", "no-frr", "--dataset", "synth", "--root", str(tmp_path / "data"),
            "--out", str(out), "--epochs", "1", "--batch-size", "10", "--seeds", "2",
            "--set", "embed_dim=16", "--set", "word_dim=8"]
    assert ablate.main(args) == 0
    printed = capsys.readouterr().out
    assert "| full | test rSum | 2 |" in printed and "| no-frr | test rSum | 2 |" in printed
    assert {p.name for p in out.iterdir() if p.is_dir()} == {
        f"cimn-{c}-seed{s}" for c in ("full", "no-frr") for s in (0, 1)}
    for s in (0, 1):
        cfg = json.loads((out / f"cimn-no-frr-seed{s}" / "config.json").read_text())
        assert cfg["seed"] == s and cfg["model_config"]["frr_layers"] == 0 and cfg["model_config"]["embed_dim"] == 16
        cfg = json.loads((out / f"cimn-full-seed{s}" / "config.json").read_text())
        assert cfg["model_config"]["frr_layers"] == models.default_config("cimn").frr_layers
    saved = json.loads((out / "ablate-cimn.json").read_text())
    rsum = {c: [r["rsum"] for r in saved["runs"][c]] for c in ("full", "no-frr")}
    row = next(r for r in saved["summary"] if r["cell"] == "no-frr" and r["figure"] == "test rSum")
    assert row == {"cell": "no-frr", "figure": "test rSum",
                   **ablate.compare_to_full(rsum["full"], rsum["no-frr"])}
    with open(out / "ablate-cimn.csv", newline="") as f:
        assert [(r["cell"], r["figure"]) for r in csv.DictReader(f)] == [
            (r["cell"], r["figure"]) for r in saved["summary"]]
    assert ablate.main(args) == 0                                   # evaluated runs are reused
    assert "training" not in capsys.readouterr().err
