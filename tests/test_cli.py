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
        "parse": (["--dataset", "x", "--chunk-size", "0"], ["--dataset", "x", *root]),
        "vocab": (["--dataset", "x", "--min-count", "0"], ["--dataset", "x", *root]),
        "extract": (["--dataset", "x", *root], ["--dataset", "x", "--weights", "random", *root]),
        "train": (["--model", "vsepp", "--dataset", "x", "--out", tmp / "r", "--set", "no_such=1", *root],
                  ["--model", "vsepp", "--dataset", "x", "--out", tmp / "r", *root]),
        "evaluate": ([], [tmp / "empty"]),
        "retrieve": ([tmp / "empty"], [tmp / "empty", "--image-id", "3"]),
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
