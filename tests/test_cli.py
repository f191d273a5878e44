"""`itmkit COMMAND`: every command's --help shows every default, usage errors exit 2 and failures
exit 1 with one line, one `--set` grammar for every consumer, the earlier spellings still work,
and a command's module is imported only when it runs."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from itmkit.cli import COMMANDS, build_parser, main
from pipeline.config import UsageError, typed_settings

REPO = Path(__file__).resolve().parents[1]


def command_parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def exit_code(argv) -> tuple[int, str]:
    """(exit status, stderr) of ``itmkit ARGV`` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_shows_the_default_of_every_option(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0 and f"usage: itmkit {name}" in capsys.readouterr().out
    parser = command_parser(name)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        assert action.help, f"{name} {action.option_strings[0]}: no help"
        if action.nargs == 0 or action.default in (None, "", []):
            continue
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        shown = " ".join(formatter.format_help().split())
        assert f"default: {action.default}" in shown or f"default {action.default}" in shown, \
            f"{name} {action.option_strings[0]}: default {action.default!r} not in --help: {shown}"


def test_itmkit_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(name in out for name in COMMANDS)


def test_the_earlier_progress_flag_is_kept_but_not_shown(capsys):
    parser = command_parser("parse")
    assert parser.parse_args(["--dataset", "x", "--no-progress"]).quiet
    assert parser.parse_args(["--dataset", "x", "--quiet"]).quiet
    assert "--no-progress" not in parser.format_help()


def cases(tmp: Path) -> dict[str, tuple[list, list]]:
    """command -> (a usage error, a failure): each must name what is wrong."""
    (tmp / "afile").write_text("")
    (tmp / "empty").mkdir()
    (tmp / "bad.pt").write_bytes(b"not a checkpoint")
    root = ["--root", tmp]
    return {
        "demo": (["--images", "1", *root], ["--root", tmp / "afile", "--images", "8", "--quiet"]),
        "ingest": (["--manifest", "f30k", "--set", "no_such=1", *root], ["--manifest", "nonexistent", *root]),
        "import-precomp": (["--dir", tmp, "--name", "x", "--images-per-shard", "0"],
                           ["--dir", tmp / "nope", "--name", "x", *root]),
        "parse": (["--dataset", "x", "--shard-size", "0"], ["--dataset", "x", *root]),
        "vocab": (["--dataset", "x", "--min-count", "0"], ["--dataset", "x", *root]),
        "extract": (["--dataset", "x", *root], ["--dataset", "x", "--weights", "random", *root]),
        "train": (["--model", "vsepp", "--dataset", "x", "--out", tmp / "r", "--set", "no_such=1", *root],
                  ["--model", "vsepp", "--dataset", "x", "--out", tmp / "r", *root]),
        "evaluate": ([], [tmp / "empty"]),
        "retrieve": ([tmp / "empty"], [tmp / "empty", "--image-id", "3"]),
        "serve": ([], [tmp / "empty"]),
        "report": ([tmp / "empty", "--queries", "0"], [tmp / "empty"]),
        "plot": ([], [tmp / "empty"]),
        "verify": ([], [tmp / "empty"]),
        "inspect": ([], [tmp / "nope.h5"]),
        "prune": ([tmp / "empty", "--kind", "regions"], [tmp / "empty", "--kind", "regions", "--shard-size", "2"]),
        "upgrade": ([], [tmp / "bad.pt"]),
    }


def test_usage_errors_exit_2_and_failures_exit_1_with_one_line(tmp_path):
    table = cases(tmp_path)
    assert set(table) == set(COMMANDS)
    for name, (usage, failure) in table.items():
        code, err = exit_code([name, *usage])
        assert code == 2 and err.strip(), (name, code, err)
        code, err = exit_code([name, *failure])
        assert code == 1 and "Traceback" not in err and err.strip(), (name, code, err)


def test_a_missing_step_is_named_with_the_root_to_copy(tmp_path):
    (tmp_path / "f30k").mkdir()
    code, err = exit_code(["train", "--model", "vsepp", "--dataset", "f30k", "--root", tmp_path,
                           "--out", tmp_path / "r"])
    assert code == 1 and (f"`itmkit parse --dataset f30k --root {tmp_path}` and "
                          f"`itmkit vocab --dataset f30k --root {tmp_path}`") in err
    code, err = exit_code(["vocab", "--dataset", "f30k", "--root", tmp_path])
    assert code == 1 and f"`itmkit parse --dataset f30k --root {tmp_path}`" in err
    code, err = exit_code(["extract", "--dataset", "f30k", "--root", tmp_path, "--weights", "random"])
    assert code == 1 and f"--root {tmp_path}`" in err


def test_a_dataset_that_is_not_there_is_said_so(tmp_path):
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "shards.json").write_text("{}")
    code, err = exit_code(["train", "--model", "vsepp", "--dataset", "nosuch", "--root", tmp_path,
                           "--out", tmp_path / "r"])
    assert code == 1 and f"no dataset 'nosuch' under {tmp_path} (its datasets: coco)" in err
    assert "vocab.json" not in err and not (tmp_path / "r").exists()


def test_precomp_data_says_grid_features_need_images(tmp_path):
    from test_precomp import make_precomp
    from training.data import shard_hashes
    from pipeline.shards import Layout, ShardError

    make_precomp(tmp_path / "pc", splits=(("train", 2), ("dev", 1), ("test", 1)), boxes=2)
    assert exit_code(["import-precomp", "--dir", tmp_path / "pc", "--name", "f30k", "--root", tmp_path,
                      "--quiet"])[0] == 0
    code, err = exit_code(["train", "--model", "dsrln", "--dataset", "f30k", "--root", tmp_path,
                           "--out", tmp_path / "r"])
    assert code == 1 and f"`itmkit parse --dataset f30k --root {tmp_path}` and `itmkit vocab" in err
    with pytest.raises(ShardError, match="grid features, which are extracted from the images; a dataset "
                                         "imported from precomp features has none"):
        shard_hashes(Layout(tmp_path, "f30k"), ["train"], grid=True)
    code, err = exit_code(["extract", "--dataset", "f30k", "--root", tmp_path, "--weights", "random"])
    assert code == 1 and "imported from precomp features" in err


def test_extract_needs_weights_said_out_loud(tmp_path):
    code, err = exit_code(["extract", "--dataset", "x", "--root", tmp_path])
    assert code == 2 and "--weights" in err


def test_one_set_grammar_typed_by_each_config():
    from features.config import ExtractorConfig
    from training import models

    cfg = models.get("vsepp").config_class
    got = typed_settings(["lr=1e-4", "lr_decay_epochs=10,20", "max_violation=false", "epochs=3"], cfg, "vsepp")
    assert got == {"lr": 1e-4, "lr_decay_epochs": (10, 20), "max_violation": False, "epochs": 3}
    assert typed_settings(["lr_decay_epochs=[5, 8]"], cfg, "vsepp") == {"lr_decay_epochs": (5, 8)}
    ext = typed_settings(["anchor_sizes=[32, 64]", "pooler=roi_pool", "nms=1"], ExtractorConfig, "x")
    assert ext == {"anchor_sizes": (32, 64), "pooler": "roi_pool", "nms": 1.0}
    with pytest.raises(UsageError, match="no setting 'embed_dims'; its settings: embed_dim, "):
        typed_settings(["embed_dims=3"], cfg, "vsepp")
    for bad in ("epochs=2.5", "epochs=many", "max_violation=maybe", "lr=true", "novalue"):
        with pytest.raises(UsageError):
            typed_settings([bad], cfg, "vsepp")


def test_manifest_set_keys_are_checked_against_the_schema():
    from pipeline import manifest

    assert manifest.load("f30k", sets=["expected.splits.test=7"])["expected"]["splits"]["test"] == 7
    with pytest.raises(UsageError, match="no field 'expectd'; its fields: .*expected"):
        manifest.load("f30k", sets=["expectd=null"])


def test_compare_routes_model_settings_and_checks_them():
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.compare import model_sets
    finally:
        sys.path.remove(str(REPO))
    items = ["embed_dim=64", "kidrr:sim_dim=8"]
    assert model_sets(items, "kidrr") == ["embed_dim=64", "sim_dim=8"]
    assert model_sets(items, "vsepp") == ["embed_dim=64"]
    assert model_sets(["pair_batches=relation"], "vsepp") == ["pair_batches=relation"]   # a run setting
    with pytest.raises(UsageError, match="unknown model 'kidr'"):
        model_sets(["kidr:sim_dim=8"], "vsepp")
    with pytest.raises(UsageError, match="no setting 'sim_dim'"):
        model_sets(["sim_dim=8"], "vsepp")


def test_commands_are_imported_only_when_they_run():
    code = ("import sys\nfrom itmkit.cli import main\n"
            "try:\n    main(['ingest', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'pipeline.ingest', 'training.train') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "['pipeline.ingest']"


def test_the_workflow_leaves_the_vocabulary_default_to_the_command(tmp_path):
    """config.yaml sets no min_count, so the workflow's vocab job runs `vocab` with its default."""
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                        str(tmp_path), "-n", "-p", "demo", "--config", f"root={tmp_path / 'data'}",
                        f"runs={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    vocab = next(line for line in r.stdout.splitlines() if re.search(r"pipeline vocab|itmkit vocab", line))
    assert "--dataset demo" in vocab and "--min-count" not in vocab


# every command that names a dataset, with what else it needs to get that far
DATASET_COMMANDS = {
    "ingest": ["--manifest", "demo", "--name"],
    "import-precomp": ["--dir", "pc", "--name"],
    "parse": ["--dataset"],
    "vocab": ["--dataset"],
    "extract": ["--weights", "random", "--dataset"],
    "train": ["--model", "vsepp", "--out", "run", "--dataset"],
}


def test_every_dataset_option_takes_a_name_never_a_path(tmp_path):
    """A dataset is a folder right under --root: `--dataset ../x` is a usage error of every
    command, checked by one option type, and nothing is written anywhere."""
    from pipeline.config import DATASET_NAME, dataset_name

    named = {name for name in COMMANDS for a in command_parser(name)._actions
             if {"--dataset", "--name"} & set(a.option_strings) and a.type is dataset_name}
    others = {name for name in COMMANDS for a in command_parser(name)._actions
              if {"--dataset", "--name"} & set(a.option_strings)}
    assert named == others == set(DATASET_COMMANDS)
    root = tmp_path / "root"
    root.mkdir()
    for name, args in DATASET_COMMANDS.items():
        for bad in ("../x", "/abs", "a/b", "..", ".hidden", ""):
            code, err = exit_code([name, *args, bad, "--root", root])
            assert code == 2 and f"{bad!r} is not a dataset name" in err, (name, bad, err)
    assert [p.name for p in tmp_path.iterdir()] == ["root"] and not any(root.iterdir())
    code, _ = exit_code(["vocab", "--dataset", "f30k.v2-small_1", "--root", root])
    assert code == 1   # a name: it gets as far as looking for the graphs
    # a manifest's `name` follows the same rule
    import yaml
    schema = yaml.safe_load((REPO / "manifests" / "schema.yaml").read_text())
    assert schema["properties"]["name"]["pattern"] == f"^{DATASET_NAME.pattern}$"


# ---------------------------------------------------------------------------------------------
# one vocabulary of options

RUNS_A_MODEL = {"extract", "train", "evaluate", "retrieve", "report", "serve"}   # --threads, --workers
TAKES_SET = {"ingest", "extract", "train"}                              # a config to set keys of
READS_DATA = set(DATASET_COMMANDS) | {"demo", "evaluate", "retrieve", "report", "serve"}   # --root


def options(name: str) -> dict[str, argparse.Action]:
    return {flag: a for a in command_parser(name)._actions for flag in a.option_strings}


def test_every_command_speaks_one_vocabulary_of_options():
    """--quiet everywhere; --root wherever a dataset is read or written; --threads and --workers,
    with one default, wherever a model runs; --set where a config has keys (as the README says)."""
    for name in COMMANDS:
        opts = options(name)
        assert "--quiet" in opts, name
        assert ("--root" in opts) == (name in READS_DATA), name
        assert ("--set" in opts) == (name in TAKES_SET), name
        assert {"--threads", "--workers"} <= set(opts) if name in RUNS_A_MODEL else "--threads" not in opts, name
        if name in RUNS_A_MODEL:   # the same default, resolved when the command runs
            assert opts["--threads"].default is None and opts["--workers"].default is None, name
    readme = (REPO / "README.md").read_text()
    assert "`--set KEY=VALUE` (ingest, extract, train" in " ".join(readme.split())


def test_one_option_names_rows_per_shard():
    assert "--chunk-size" not in command_parser("parse").format_help()
    assert command_parser("parse").parse_args(["--dataset", "x", "--shard-size", "7"]).chunk_size == 7
    assert command_parser("parse").parse_args(["--dataset", "x", "--chunk-size", "7"]).chunk_size == 7
    prune = command_parser("prune")
    assert "--chunk-size" not in prune.format_help()
    assert prune.parse_args(["d", "--kind", "graphs", "--chunk-size", "5"]).shard_size == 5


def test_a_usage_error_is_one_line_that_names_the_help(tmp_path):
    table = cases(tmp_path)
    table["evaluate"] = ([tmp_path / "empty", "--no-such-option", "1"], None)   # said by evaluate, not itmkit
    for name, (usage, _) in table.items():
        code, err = exit_code([name, *usage])
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (name, err)
        assert lines[0].startswith(f"itmkit {name}: error: ") and lines[0].endswith(
            f"(see `itmkit {name} --help`)"), (name, err)
    code, err = exit_code(["nosuch"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "see `itmkit --help`" in err


# ---------------------------------------------------------------------------------------------
# the thread default

def test_the_thread_default_leaves_busy_cores_and_the_workers_alone():
    from pipeline.config import default_threads

    assert default_threads(0, usable=2, busy=0.0, machine=2) == 2     # idle: every usable CPU
    assert default_threads(0, usable=2, busy=5.0, machine=2) == 1     # loaded: one, never 0
    assert default_threads(0, usable=2, busy=1.0, machine=2) == 1
    assert default_threads(2, usable=4, busy=0.0, machine=4) == 2     # the workers' cores are theirs
    assert default_threads(4, usable=2, busy=0.0, machine=2) == 1
    assert default_threads(0, usable=4, busy=40.0, machine=64) == 4   # a quota on a big, busy host
    assert default_threads(0, usable=16, busy=10.0, machine=16) == 6


def test_usable_cpus_reads_the_affinity_and_the_cgroup_quota(tmp_path, monkeypatch):
    from pipeline.config import usable_cpus

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert usable_cpus(tmp_path) == 8                               # no quota files
    (tmp_path / "cpu.max").write_text("250000 100000\n")             # cgroup v2: 2.5 CPUs
    assert usable_cpus(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == 8
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path / "v1") == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cpus(tmp_path / "v1") == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert usable_cpus(tmp_path) == 2                               # the affinity mask caps it


def test_busy_cpus_counts_the_tasks_running_now_less_this_one(tmp_path):
    from pipeline.config import busy_cpus

    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.10 0.20 0.30 6/300 4242\n")   # the average lags; 5 others run now
    assert busy_cpus(loadavg, samples=3, every_s=0) == 5.0
    loadavg.write_text("7.00 6.00 5.00 1/300 4242\n")   # only this one runs now
    assert busy_cpus(loadavg, samples=3, every_s=0) == 0.0
    assert busy_cpus(tmp_path / "nope", samples=1) == 0.0


def test_threads_given_win_and_the_default_is_set_only_while_the_command_runs(monkeypatch):
    import torch

    from pipeline import config

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(config, "busy_cpus", lambda: 0.0)
    monkeypatch.setattr(config, "usable_cpus", lambda: 3)
    monkeypatch.setattr(config.os, "cpu_count", lambda: 3)
    args = argparse.Namespace(threads=None, workers=None, device="cpu")
    with config.command_threads(args):
        assert (args.workers, args.threads, torch.get_num_threads()) == (0, 3, 3)
    assert torch.get_num_threads() == before
    args = argparse.Namespace(threads=None, workers=None, device="cuda:1")
    with config.command_threads(args):
        assert (args.workers, args.threads) == (2, 1)
    args = argparse.Namespace(threads=2, workers=5, device="cpu")
    with config.command_threads(args):
        assert (args.workers, args.threads, torch.get_num_threads()) == (5, 2, 2)
    assert torch.get_num_threads() == before
    # OMP_NUM_THREADS is the default when set (processes started side by side all see an idle
    # machine at their start); --threads still wins over it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = argparse.Namespace(threads=None, workers=None, device="cpu")
    with config.command_threads(args):
        assert (args.threads, torch.get_num_threads()) == (1, 1)
    args = argparse.Namespace(threads=3, workers=None, device="cpu")
    with config.command_threads(args):
        assert args.threads == 3


def test_omp_num_threads_is_read_as_openmp_reads_it():
    from pipeline.config import env_threads

    assert env_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert env_threads({"OMP_NUM_THREADS": "4,2"}) == 4      # a nested list: the outer level
    assert env_threads({"OMP_NUM_THREADS": " 2 "}) == 2
    for bad in ("", "0", "-1", "two", "1.5"):
        assert env_threads({"OMP_NUM_THREADS": bad}) is None
    assert env_threads({}) is None
