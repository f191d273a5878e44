"""The store under faults: processes that write one dataset at the same time, altered shards,
a full disk, reruns that must give the same bytes, and the workflow's config errors."""

import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from itmkit.cli import main as features_main
from itmkit import cli
from pipeline import parse, shards
from pipeline.shards import ShardError, Vocabulary
from test_features_extract import FAST, make_dataset
from test_parse import write_captions
from training.data import DataConfig, ShardData
from training.synthetic import make_dataset as make_synth

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def extract(layout, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = features_main(["extract", "--dataset", layout.name, "--root", str(layout.root), *FAST, *args])
    return rc, out.getvalue(), err.getvalue()


def extract_cmd(layout, *args):
    return [sys.executable, "-m", "itmkit", "extract", "--dataset", layout.name, "--root",
            str(layout.root), *FAST, *args]


def flip_byte(path: Path, where: float = 0.5) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------
# concurrent writers

HOLD = textwrap.dedent("""
    import sys, time
    from pipeline.shards import atomic_path
    with atomic_path(sys.argv[1]) as tmp:
        tmp.write_text("first")
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    """A second writer used to delete the first one's <name>.tmp (FileNotFoundError on rename)."""
    target = tmp_path / "x.json"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(target), "1.5"], stdout=subprocess.PIPE,
                             text=True, env=ENV)
    assert first.stdout.readline().strip() == "writing"
    shards.write_json(target, {"second": True})
    assert first.wait(60) == 0
    assert target.read_text() == "first"   # the last rename wins; both writers succeeded
    assert not list(tmp_path.glob("*.tmp"))


def test_temporary_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "a.h5"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = [tmp_path / f"a.h5.{shards.atomic.HOST}-{dead}-00ff.tmp", tmp_path / "a.h5.tmp"]
    live = [tmp_path / f"a.h5.{shards.atomic.HOST}-{os.getpid()}-00aa.tmp",
            tmp_path / f"a.h5.otherhost-{dead}-00bb.tmp"]
    for p in stale + live:
        p.write_text("x")
    shards.write_json(target, {})
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


def test_extract_waits_for_a_chunk_another_process_is_writing(tmp_path):
    layout, _ = make_dataset(tmp_path, splits=("train",) * 2)
    held = layout.grid("train", 0)
    with shards.claim(held) as ok:
        assert ok
        proc = subprocess.Popen(extract_cmd(layout, "--kind", "grid", "--shard-size", "1"), cwd=REPO,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and not layout.grid("train", 1).exists():
            time.sleep(0.05)
        time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()      # waiting for the claimed chunk
        assert layout.grid("train", 1).exists() and not held.exists()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "being written by another process; waiting" in err
    assert layout.index.verify() == [] and len(layout.index.entries("grid")) == 2


@pytest.mark.slow
def test_concurrent_extracts_and_parses_end_verified(tmp_path):
    """Three `features extract` and three `pipeline parse` on one dataset at the same time."""
    layout, _ = make_dataset(tmp_path, splits=("train",) * 6 + ("test",) * 3)
    write_captions(tmp_path, name=layout.name, n=60)
    procs = [subprocess.Popen(extract_cmd(layout, "--kind", "both", "--shard-size", "2"), cwd=REPO,
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    procs += [subprocess.Popen([sys.executable, "-m", "itmkit", "parse", "--dataset", layout.name,
                                "--root", str(tmp_path), "--chunk-size", "10", "--no-progress"],
                               cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    index = layout.index
    assert index.verify() == []
    assert sorted(e.path for e in index.entries("regions")) == \
        [f"regions/regions-{s}-{k:04d}.h5" for s, k in (("test", 0), ("test", 1), ("train", 0),
                                                        ("train", 1), ("train", 2))]
    assert len(index.entries("grid")) == 5 and len(index.entries("graphs")) == 6
    assert not list(layout.dir.rglob("*.tmp"))
    assert cli.main(["verify", str(layout.dir)]) == 0


# ---------------------------------------------------------------------------------------------
# altered shards

def test_trainer_refuses_an_altered_shard(tmp_path):
    layout = make_synth(tmp_path, splits={"train": 20, "test": 4}, images_per_shard=8)
    vocab = Vocabulary.load(layout.vocab)
    ShardData(tmp_path, "synth", vocab, DataConfig(split="train"))
    altered = layout.regions("train", 1)
    flip_byte(altered)
    with pytest.raises(ShardError, match=r"regions-train-0001.h5: sha256 differs from shards.json"):
        ShardData(tmp_path, "synth", vocab, DataConfig(split="train"))
    ShardData(tmp_path, "synth", vocab, DataConfig(split="test"))   # the other split is intact
    ShardData(tmp_path, "synth", vocab, DataConfig(split="train", verify=False))  # explicitly trusted


def test_writers_rewrite_an_altered_shard(tmp_path):
    layout, _ = make_dataset(tmp_path, splits=("train",) * 4)
    assert extract(layout, "--kind", "regions", "--shard-size", "2")[0] == 0
    path = layout.regions("train", 1)
    before = path.read_bytes()
    flip_byte(path, 0.9)  # inside the features: same size, still a readable HDF5 file
    rc, out, err = extract(layout, "--kind", "regions", "--shard-size", "2")
    assert rc == 0 and "wrote 1 regions" in out and "reused 1" in out, out
    assert "regions-train-0001.h5" in err and "altered" in err
    assert path.read_bytes() == before and layout.index.verify() == []


def test_parse_rewrites_an_altered_chunk(tmp_path, capsys):
    parse._model(parse.ParseConfig().model)
    layout = write_captions(tmp_path, n=20)
    args = ["parse", "--dataset", "toy", "--root", str(tmp_path), "--chunk-size", "10", "--no-progress"]
    assert cli.main(args) == 0
    path = layout.graphs(1)
    before = path.read_bytes()
    flip_byte(path, 0.3)
    capsys.readouterr()
    assert cli.main(args) == 0
    out, err = capsys.readouterr()
    assert "wrote 1 chunk(s)" in out and "graphs-0001.parquet" in err and "altered" in err
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# a full disk

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_grid_shard_is_one_line(tmp_path, monkeypatch):
    layout, _ = make_dataset(tmp_path, splits=("train",) * 2)
    monkeypatch.setattr(h5py.File, "flush", no_space)
    rc, out, err = extract(layout, "--kind", "grid")
    assert rc == 1
    assert err.strip().splitlines()[-1] == (f"features extract: error: {layout.grid('train', 0)}: no space "
                                            "left on device (nothing was written under this name; free "
                                            "some space and rerun)")
    assert "Traceback" not in err
    assert not layout.grid("train", 0).exists() and not list(layout.dir.rglob("*.tmp"))
    assert layout.index.entries("grid") == []


def test_full_disk_while_writing_a_table_is_one_line(tmp_path, monkeypatch, capsys):
    parse._model(parse.ParseConfig().model)
    layout = write_captions(tmp_path, n=10)
    monkeypatch.setattr(shards.tables.pq, "write_table", no_space)
    assert cli.main(["parse", "--dataset", "toy", "--root", str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"parse: error: {layout.graphs(0)}: no space left on device")
    assert not layout.graphs(0).exists() and layout.index.entries("graphs") == []


def test_full_disk_while_streaming_a_region_shard(tmp_path, monkeypatch):
    writer = shards.RegionShardWriter(tmp_path / "r.h5", boxes_per_chunk=4)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", no_space)
    with pytest.raises(ShardError, match="r.h5: no space left on device"):
        with writer:
            for i in range(3):
                writer.append(shards.Regions(i, (5, 5), np.ones((4, 2048), np.float16)))
    assert list(tmp_path.iterdir()) == []


FULL_DISK = textwrap.dedent("""
    set -e
    mount -t tmpfs -o size=4m tmpfs "$1"
    cp -r "$2" "$1/data"
    cd "$3"
    set +e
    "$4" -m itmkit extract --dataset toy --root "$1/data" --kind both --shard-size 2 {fast} > "$5" 2>&1
    echo "rc=$?" >> "$5"
    "$4" -m itmkit verify "$1/data/toy" >> "$5" 2>&1
""")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a tmpfs")
def test_full_disk_on_a_small_tmpfs(tmp_path):
    """The real thing, when this machine lets a user namespace mount a 4 MB tmpfs."""
    layout, _ = make_dataset(tmp_path / "src", splits=("train",) * 12)
    mnt, log = tmp_path / "mnt", tmp_path / "log.txt"
    mnt.mkdir()
    script = FULL_DISK.format(fast=" ".join(f"'{a}'" for a in FAST))
    r = subprocess.run(["unshare", "-Urm", "bash", "-c", script, "-", str(mnt), str(tmp_path / "src"),
                        str(REPO), sys.executable, str(log)], env=ENV, capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0 and not log.exists():
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
    text = log.read_text()
    assert "rc=1" in text, text[-3000:]
    assert "no space left on device" in text and "Traceback" not in text and "Exception ignored" not in text
    assert "0 bad" in text   # what is registered is intact


# ---------------------------------------------------------------------------------------------
# reproducible bytes and early, short errors

def test_identical_runs_write_identical_bytes(tmp_path):
    a, _ = make_dataset(tmp_path / "a", splits=("train",) * 2)
    b, _ = make_dataset(tmp_path / "b", splits=("train",) * 2)
    for layout in (a, b):
        assert extract(layout, "--kind", "both", "--shard-size", "1")[0] == 0
    for kind in ("regions", "grid"):
        for k in range(2):
            assert getattr(a, kind)("train", k).read_bytes() == getattr(b, kind)("train", k).read_bytes()
    assert "created" not in shards.RegionShard(a.regions("train", 0)).attrs
    assert a.index.entries("regions")[0].created  # the time is kept in shards.json


def test_refused_weights_stop_extract_before_it_announces_replacements(tmp_path):
    from features.rcnn import BottomUpRCNN
    from features.weights import load_weights, save_detectron2_pickle
    from itmkit.cli import build_parser
    from features.extract import config_from_args

    layout, _ = make_dataset(tmp_path, splits=("val",) * 2)
    assert extract(layout, "--kind", "regions")[0] == 0
    model = BottomUpRCNN(config_from_args(build_parser().parse_args(["extract", "--dataset", "toy", *FAST])))
    load_weights(model, "random", seed=3)
    weights = save_detectron2_pickle(model, tmp_path / "w.pkl")
    rc, out, err = extract(layout, "--kind", "regions", "--weights", str(weights), "--set", "num_attributes=12")
    assert rc == 1 and "attr_score.weight" in err
    assert "another config" not in err and "replaced" not in err


def test_workflow_config_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory",
                        str(tmp_path), "-n", "demo", "--config", "bogus_key=1", f"root={tmp_path}"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0
    lines = [l for l in (r.stdout + r.stderr).splitlines()
             if l.strip() and not l.startswith("Config file ")]
    assert lines == ["config error: unknown key(s) bogus_key (the keys are listed in schema.yaml)"]
