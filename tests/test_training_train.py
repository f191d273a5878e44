"""train.py end to end on a tiny synthetic dataset: resume is exact, DDP on CPU, bad input,
evaluate (which keeps what it computed) and plot, and the baseline learns. The scripts' ``main``
runs in-process (torch is already imported); only the DDP test starts processes."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import shards
from pipeline.shards import ShardError
from training import checkpoint, evaluate, models, plot, train
from training.checkpoint import CheckpointError
from training.config import parse_shared_overrides
from training.evaluation import chance_metrics
from training.run import load_run
from training.synthetic import make_dataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--set", "embed_dim=32", "--set", "word_dim=16", "--batch-size", "20", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, splits={"train": 24, "val": 8, "test": 8})
    return root


def run_train(root, out, *extra):
    return train.main(["--model", "vsepp", "--dataset", "synth", "--root", str(root),
                       "--out", str(out), *SMALL, *map(str, extra)])


def run_eval(*args):
    return evaluate.main([*map(str, args), "--workers", "0"])


def test_resume_gives_identical_results(root, tmp_path, capsys):
    run_train(root, tmp_path / "full", "--epochs", "2")
    run_train(root, tmp_path / "split", "--epochs", "2", "--stop-after", "1")
    assert checkpoint.load(tmp_path / "split" / "last.pt")["epoch"] == 0
    run_train(root, tmp_path / "split", "--resume")
    assert "1 epoch(s) run (1 done before)" in capsys.readouterr().out
    a = checkpoint.load(tmp_path / "full" / "last.pt")
    b = checkpoint.load(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1 and a["step"] == b["step"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    lines = lambda d: [ln.split(",")[:-2] for ln in (d / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert lines(tmp_path / "full") == lines(tmp_path / "split")   # all but the two seconds columns
    assert len(lines(tmp_path / "full")) == 3
    assert any((tmp_path / "full" / "tb").iterdir())


def test_resume_refuses_a_recipe_other_than_the_runs(root, tmp_path, capsys):
    run_train(root, tmp_path / "r", "--epochs", "2", "--stop-after", "1")
    run_train(root, tmp_path / "r", "--epochs", "2", "--resume")      # the same recipe: fine
    with pytest.raises(SystemExit) as e:
        run_train(root, tmp_path / "r", "--epochs", "3", "--set", "margin=0.5", "--resume")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "epochs (2 saved, 3 given)" in err and "margin (0.2 saved, 0.5 given)" in err


def test_evaluate_save_sims_ensemble_hard_negatives_and_plot(root, tmp_path, capsys):
    out = tmp_path / "r"
    run_train(root, out, "--epochs", "1")
    run_eval(out, "--root", root, "--save-sims", "--hard-negatives", "--protocol", "f30k-1k",
             "--protocol", "coco-1k", "--fold-size", "4")
    printed = capsys.readouterr().out
    assert "f30k-1k (test, 8 images)" in printed and "hard negatives [attribute] 4 pairs" in printed
    res = json.loads((out / "eval.json").read_text())
    assert res["test/coco-1k"]["folds"] == 2 and 0 <= res["test/f30k-1k"]["rsum"] <= 600
    run_eval("--ensemble", out, out, "--root", root, "--protocol", "f30k-1k")
    assert f"rSum {res['test/f30k-1k']['rsum']:.1f}" in capsys.readouterr().out  # a run with itself
    plot.main([str(out)])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def vsepp_run(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vsepp"
    run_train(root, out, "--epochs", "1")
    return out


def test_load_run_gives_config_vocab_model_split_and_checkpoint(vsepp_run, root):
    run = load_run(vsepp_run, split="val", max_images=5)
    assert run.root == Path(root).absolute() and run.config.model == "vsepp"   # the recorded root
    assert run.vocab.fingerprint == run.config.vocab_fingerprint
    assert run.data.n_images == 5 and run.data.cfg.split == "val"
    assert run.shard_hashes == run.data.hashes and set(run.shard_hashes) == {"regions", "captions", "graphs"}
    assert not run.model.training and "model" not in run.checkpoint and run.checkpoint["epoch"] == 0
    best = checkpoint.load(vsepp_run / "best.pt")["model"]
    assert all(torch.equal(v, best[k]) for k, v in run.model.state_dict().items())
    assert load_run(vsepp_run, which="last").data is None


def test_epoch_line_and_metrics_show_chance_and_a_small_split_is_warned(root, tmp_path, capsys):
    run_train(root, tmp_path / "r", "--epochs", "1")
    err = capsys.readouterr().err
    chance = chance_metrics(8)["rsum"]
    assert f"(chance {chance:.1f}; R@1" in err
    assert "warning: split 'val' has only 8 image(s)" in err
    row = next(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert int(row["val_images"]) == 8 and float(row["chance_rsum"]) == pytest.approx(chance)
    assert 0 < float(row["train_seconds"]) < float(row["seconds"])   # the loop, then validation


def test_threads_option_sets_torchs_cpu_threads(root, tmp_path, monkeypatch):
    seen, real = [], train.train
    monkeypatch.setattr(train, "train", lambda *a: (seen.append(torch.get_num_threads()), real(*a))[1])
    torch.set_num_threads(2)   # the module's fixture restores the count afterwards
    run_train(root, tmp_path / "r", "--epochs", "1", "--threads", "1")
    assert seen == [1] and torch.get_num_threads() == 2   # set for the run, restored after it
    with pytest.raises(SystemExit) as e:
        run_train(root, tmp_path / "s", "--epochs", "1", "--threads", "-1")
    assert e.value.code == 2 and not (tmp_path / "s").exists()


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_foreach_optimiser_step_and_clipping_are_bitwise_torchs_default(opt_cls):
    """The trainer steps and clips with foreach=True, which on the CPU replaces torch's default
    loop over the tensors: the same weights, bit for bit, after a few steps."""
    from training.data import Batch
    from training.synthetic import random_caption_batches, random_image_batches, random_vocab
    vocab = random_vocab()
    batches = [Batch(i, t) for i, t in zip(random_image_batches(16, 4, 64, 4, None),
                                            random_caption_batches(16, vocab, 4))]
    weights = []
    for foreach in (None, True):   # None: torch's choice (the per-tensor loop on the CPU)
        torch.manual_seed(0)
        model = models.build("vsepp", {"embed_dim": 32, "word_dim": 16, "feature_dim": 64}, vocab)
        start = model.img_fc.weight.detach().clone()
        opt = opt_cls(model.parameters(), lr=1e-2, weight_decay=1e-3, foreach=foreach)
        for b in batches:
            opt.zero_grad()
            model(b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5, foreach=foreach)
            opt.step()
        assert not torch.equal(model.img_fc.weight, start)   # the steps changed the weights
        weights.append(model.state_dict())
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k


def test_evaluate_defaults_to_the_runs_data_root(vsepp_run, root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                       # no data/ here, nor config/config.yaml
    monkeypatch.delenv("ITMKIT_DATA", raising=False)
    assert run_eval(vsepp_run) == 0
    assert "f30k-1k (test, 8 images)" in capsys.readouterr().out
    with pytest.raises(ShardError, match="elsewhere"):   # --root still overrides
        run_eval(vsepp_run, "--root", tmp_path / "elsewhere")


def test_plot_log_loss_integer_epochs_chance_and_one_panel_per_validation_size(vsepp_run, tmp_path):
    rows = list(csv.DictReader(open(vsepp_run / "metrics.csv")))
    bigger, old = tmp_path / "bigger", tmp_path / "old"
    for run, changes, drop in ((bigger, {"val_images": 200, "chance_rsum": 15.9}, ()),
                               (old, {}, ("val_images", "chance_rsum"))):   # written before they were
        run.mkdir()
        with open(run / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, [k for k in rows[0] if k not in drop])
            w.writeheader()
            for epoch in (1, 2, 3):
                w.writerow({k: v for k, v in {**rows[0], **changes, "epoch": epoch}.items() if k not in drop})
    fig = plot.draw([str(vsepp_run), str(bigger), str(old)])
    loss, *panels = fig.axes
    assert loss.get_yscale() == "log"
    assert [ax.get_title() for ax in panels] == ["validation rSum, 8 images", "validation rSum, 200 images",
                                                 "validation rSum (size not recorded)"]
    chance = [[ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "--"] for ax in panels]
    assert chance == [[pytest.approx(chance_metrics(8)["rsum"])], [15.9], []]
    for fig in (fig, plot.draw([str(vsepp_run)])):     # 3 epochs, and a 1-epoch run alone
        fig.canvas.draw()
        assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())


def test_ensemble_as_the_help_shows_writes_its_results(vsepp_run, tmp_path, capsys):
    assert run_eval(vsepp_run, "--save-sims") == 0
    other = tmp_path / "copy"
    other.mkdir()
    (other / "sims-test.npz").write_bytes(evaluate.sims_path(vsepp_run, "test").read_bytes())
    capsys.readouterr()
    assert run_eval("--ensemble", vsepp_run, other) == 0
    res = json.loads((vsepp_run / "eval-ensemble.json").read_text())
    single = json.loads((vsepp_run / "eval.json").read_text())["test/f30k-1k"]
    assert res["test/f30k-1k"]["rsum"] == pytest.approx(single["rsum"])
    assert res["test/f30k-1k"]["runs"] == [str(vsepp_run), str(other)]
    assert "wrote " + str(vsepp_run / "eval-ensemble.json") in capsys.readouterr().out
    assert run_eval(other, "--ensemble", vsepp_run, other) == 0      # a run folder given: written there
    assert json.loads((other / "eval-ensemble.json").read_text())["test/f30k-1k"]["rsum"] == res["test/f30k-1k"]["rsum"]
    with pytest.raises(SystemExit) as e:                # neither a run nor an ensemble: usage error
        run_eval()
    assert e.value.code == 2


def test_parts_that_cannot_run_are_skipped_and_the_rest_is_saved(root, tmp_path, capsys):
    # a dataset without hard-negative pairs
    data = tmp_path / "data"
    layout = make_dataset(data, splits={"train": 24, "val": 8, "test": 8})
    layout.hard_negatives.unlink()
    layout.index.unregister("hard_negatives")
    run_train(data, tmp_path / "v", "--epochs", "1")
    capsys.readouterr()
    assert run_eval(tmp_path / "v", "--hard-negatives", "--protocol", "coco-1k", "--protocol", "f30k-1k") == 0
    out, err = capsys.readouterr()
    assert "skipped --hard-negatives: the dataset has no hard-negative pairs" in err
    assert "skipped coco-1k: coco-1k needs at least 1000 images" in err
    assert "skipped coco-1k, --hard-negatives" in out
    assert list(json.loads((tmp_path / "v" / "eval.json").read_text())) == ["test/f30k-1k"]

    # a cross-attention model asked for an index
    cross = next(n for n in models.names() if not models.get(n).two_tower and not models.get(n).needs_grid)
    train.main(["--model", cross, "--dataset", "synth", "--root", str(root), "--out", str(tmp_path / "x"),
                *SMALL, "--epochs", "1"])
    capsys.readouterr()
    assert run_eval(tmp_path / "x", "--export-index", tmp_path / "idx") == 0
    assert f"skipped --export-index: model '{cross}' is a cross-attention model" in capsys.readouterr().err
    assert "test/f30k-1k" in json.loads((tmp_path / "x" / "eval.json").read_text())
    assert not (tmp_path / "idx").exists()


def test_bad_input_is_refused_and_nothing_is_overwritten(root, tmp_path):
    out = tmp_path / "r"
    run_train(root, out, "--epochs", "1")
    cfg = json.loads((out / "config.json").read_text())
    ck = checkpoint.load(out / "last.pt")
    ck["meta"]["model"] = "resg"
    checkpoint.save(out / "best.pt", ck)
    before = {f: (out / f).read_bytes() for f in ("config.json", "last.pt", "best.pt", "metrics.csv")}

    with pytest.raises(CheckpointError, match="already holds a run"):
        run_train(root, out, "--epochs", "1")
    with pytest.raises(CheckpointError, match="run dir of dataset 'synth'"):
        train.main(["--model", "vsepp", "--dataset", "other", "--root", str(root), "--out", str(out),
                    "--resume"])
    with pytest.raises(CheckpointError, match="checkpoint of model 'resg'"):   # from another model
        run_eval(out, "--root", root)
    ck["meta"]["model"], ck["meta"]["vocab_fingerprint"] = "vsepp", "0" * 16
    checkpoint.save(out / "best.pt", ck)
    before["best.pt"] = (out / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match="another vocabulary"):
        run_eval(out, "--root", root)
    checkpoint.save(out / "best.pt", {**ck, "format": 1})
    before["best.pt"] = (out / "best.pt").read_bytes()
    with pytest.raises(CheckpointError, match="checkpoint format 1, this version reads 2"):
        run_eval(out, "--root", root)

    # shards rebuilt with another config: resume and evaluation refuse them
    cfg["shard_hashes"]["regions"] = "0123456789abcdef"
    shards.write_json(out / "config.json", cfg)
    before["config.json"] = (out / "config.json").read_bytes()
    with pytest.raises(ShardError, match="expects regions shards of config 0123456789abcdef"):
        run_train(root, out, "--resume")
    with pytest.raises(ShardError, match="expects regions shards"):
        run_eval(out, "--root", root, "--checkpoint", "last")
    assert before == {f: (out / f).read_bytes() for f in before}

    with pytest.raises(SystemExit):
        train.main(["--model", "nope", "--dataset", "synth", "--out", str(out)])


def test_ddp_two_processes_gloo(root, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(REPO / "training" / "train.py"),
                        "--model", "vsepp", "--dataset", "synth", "--root", str(root),
                        "--out", str(tmp_path / "ddp"), *SMALL, "--epochs", "1"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ck = checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert ck["step"] == 120 // 20   # 2 ranks x 10 pairs per step: 120 pairs -> 6 steps
    assert p.stdout.count("train: vsepp") == 1   # one summary, from rank 0


def test_baseline_learns_on_synthetic_data(tmp_path):
    """Features depend on the caption words (training.synthetic): vsepp must beat chance by far.
    Chance rSum on 50 test images is about 60 (random scores, measured)."""
    make_dataset(tmp_path / "data", splits={"train": 120, "val": 50, "test": 50}, seed=1)
    run_train(tmp_path / "data", tmp_path / "r", "--epochs", "3", "--set", "embed_dim=64",
              "--batch-size", "50")
    run_eval(tmp_path / "r", "--root", tmp_path / "data")
    rsum = json.loads((tmp_path / "r" / "eval.json").read_text())["test/f30k-1k"]["rsum"]
    assert rsum > 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model", ["vsepp", "cimn", "dsrln", "kidrr", "resg"])
def test_amp_training_and_evaluation_on_cuda(tmp_path, model):
    """Mixed precision on CUDA (GradScaler + autocast): finite losses, a checkpoint, and GPU
    evaluation that matches the CPU's scores of the same checkpoint."""
    make_dataset(tmp_path / "data", splits={"train": 40, "val": 10, "test": 10}, grid_hw=(3, 3))
    out = tmp_path / "r"
    train.main(["--model", model, "--dataset", "synth", "--root", str(tmp_path / "data"), "--out", str(out),
                *SMALL, "--epochs", "2", "--device", "cuda"])
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all("nan" not in r for r in rows)
    sims = {}
    for device in ("cuda", "cpu"):
        run_eval(out, "--root", tmp_path / "data", "--device", device, "--save-sims")
        sims[device] = evaluate.load_sims(evaluate.sims_path(out, "test"))["sims"]
    assert abs(sims["cuda"] - sims["cpu"]).max() < 1e-3


def test_shared_overrides_skip_fields_the_model_lacks():
    cfg_class = models.get("vsepp").config_class
    got = parse_shared_overrides(["embed_dim=64", "sim_dim=8", "lr_decay_epochs=3,5"], cfg_class)
    assert got == {"embed_dim": 64, "lr_decay_epochs": (3, 5)}
    with pytest.raises(ValueError):   # a field the model has still gets its type checked
        parse_shared_overrides(["embed_dim=wide"], cfg_class)


def test_pair_batches_is_a_run_setting_that_reads_the_training_pairs(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = make_dataset(tmp_path / "data", splits={"train": 24, "val": 8, "test": 8})
    train_ids = pq.read_table(layout.images).filter(pa.compute.equal(pa.compute.field("split"), "train"))
    ids = train_ids["image_id"].to_pylist()[:6]
    pq.write_table(pa.table({"image_id": ids[0::2], "partner_id": ids[1::2],
                             "kind": ["relation", "relation", "attribute"]}), layout.hard_negatives)
    out = tmp_path / "run"
    run_train(tmp_path / "data", out, "--epochs", "1", "--set", "pair_batches=relation")
    assert "2 hard-negative image pairs (relation) of train share their batches" in capsys.readouterr().err
    assert load_run(out).config.pair_batches == "relation"
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "data", out, "--epochs", "1", "--set", "pair_batches=all", "--resume")
    assert e.value.code == 2 and "pair_batches ('relation' saved, 'all' given)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has the kinds attribute, relation \\(or: all\\)"):
        run_train(tmp_path / "data", tmp_path / "other", "--epochs", "1", "--set", "pair_batches=context")
    assert not (tmp_path / "other" / "config.json").exists()
