"""A dataset folder handed over by someone else: a shards.json whose entries lead outside the
folder, lock files that are symbolic links, and HDF5 shards whose datasets read other files.
Each is refused in one line naming it, and nothing outside the folder is opened, locked,
hashed or removed."""

import hashlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from itmkit.cli import main
from pipeline.shards import ShardError, Vocabulary, index as index_module
from training.data import DataConfig, ShardData
from training.synthetic import make_dataset as make_synth


@pytest.fixture
def handed_over(tmp_path):
    """A small dataset at tmp_path/data/synth, and a victim folder outside it."""
    layout = make_synth(tmp_path / "data", splits={"train": 4, "test": 2}, images_per_shard=2, boxes=2)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "victim.txt").write_text("not yours\n")
    return layout, victim


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def add_entry(layout, kind, path, target):
    data = json.loads(layout.index.path.read_text())
    raw = target.read_bytes()
    data["kinds"][kind].append({"kind": kind, "path": path, "sha256": hashlib.sha256(raw).hexdigest(),
                                "size": len(raw), "rows": 1, "config_hash": "other"})
    layout.index.path.write_text(json.dumps(data))


@pytest.fixture
def hashed(monkeypatch):
    """The files the index hashes."""
    seen = []
    real = index_module.sha256_file
    monkeypatch.setattr(index_module, "sha256_file", lambda p, *a: seen.append(os.path.realpath(p)) or real(p, *a))
    return seen


@pytest.mark.parametrize("kind", ["regions", "graphs"])
@pytest.mark.parametrize("how", ["climbs out", "absolute", "symbolic link"])
def test_index_entries_outside_the_folder_are_refused_and_nothing_outside_is_touched(
        handed_over, how, kind, hashed, capsys):
    layout, victim = handed_over
    target = victim / "victim.txt"
    name = {"regions": "regions/regions-train-0009.h5", "graphs": "text/graphs/graphs-0009.parquet"}[kind]
    if how == "symbolic link":
        (layout.dir / name).symlink_to(target)
    path = {"climbs out": "../../victim/victim.txt", "absolute": str(target), "symbolic link": name}[how]
    add_entry(layout, kind, path, target)
    before = snapshot(victim)
    size = "--chunk-size" if kind == "graphs" else "--shard-size"
    commands = [["verify", layout.dir], ["prune", layout.dir, "--kind", kind, size, 2],
                ["inspect", layout.index.path]]
    if kind == "graphs":  # parse removes graph chunks of another config
        commands.append(["parse", "--dataset", "synth", "--root", layout.root, "--no-progress", "--quiet"])
    for argv in commands:
        rc, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, (argv, out, err)
        assert "shards.json" in lines[0] and f"{kind} entry" in lines[0] and json.dumps(path) in lines[0], lines
    with pytest.raises(ShardError, match="the index is refused"):
        ShardData(layout.root, "synth", Vocabulary.load(layout.vocab), DataConfig(split="train"))
    assert snapshot(victim) == before            # not removed, and no lock file made next to it
    assert not any(p.startswith(str(victim)) for p in hashed)
    if how == "symbolic link":
        assert (layout.dir / name).is_symlink()  # nothing of the folder is lost either


@pytest.mark.parametrize("edit, problem", [
    (lambda e: e.pop("sha256"), "lacks field(s) sha256"),
    (lambda e: e.update(size="12"), "field 'size' is \"12\", not int"),
    (lambda e: e.update(path=5), "field 'path' is 5, not str"),
    (lambda e: e.update(rows=True), "field 'rows' is true, not int"),
    (lambda e: e.update(kind="grid"), "is listed under 'regions' but its kind is 'grid'"),
    (lambda e: e.update(owner="x"), "has an unknown field 'owner'"),
], ids=["missing", "str size", "int path", "bool rows", "other kind", "unknown field"])
def test_index_entry_with_a_bad_field_is_one_line(handed_over, edit, problem, capsys):
    layout, _ = handed_over
    data = json.loads(layout.index.path.read_text())
    edit(data["kinds"]["regions"][1])
    layout.index.path.write_text(json.dumps(data))
    for argv in (["verify", layout.dir], ["inspect", layout.index.path]):
        rc, out, err = run(capsys, *argv)
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        assert f"{layout.index.path}: regions entry 1" in err and problem in err, err


def test_a_shard_folder_linked_elsewhere_is_not_pruned(handed_over, capsys):
    layout, victim = handed_over
    shutil.rmtree(layout.dir / "grid", ignore_errors=True)
    (layout.dir / "grid").symlink_to(victim)
    (victim / "grid-train-0007.h5").write_bytes(b"someone's file")
    before = snapshot(victim)
    rc, out, err = run(capsys, "prune", layout.dir, "--kind", "grid", "--shard-size", 2)
    assert rc == 1 and "grid: resolves to" in err and "outside the dataset folder" in err, err
    assert snapshot(victim) == before


def test_lock_files_that_are_symbolic_links_are_refused_not_followed(handed_over, capsys):
    layout, victim = handed_over
    target = victim / "victim.txt"
    before = snapshot(victim)
    lock = layout.dir / "regions" / ".regions-train-0005.h5.lock"     # a writer's or prune's claim
    lock.symlink_to(target)
    layout.regions("train", 5).write_bytes(b"leftover")
    rc, out, err = run(capsys, "prune", layout.dir, "--kind", "regions", "--shard-size", 2)
    assert rc == 1 and f"{lock}: is a symbolic link" in err, err
    (layout.dir / "shards.json.lock").unlink(missing_ok=True)
    (layout.dir / "shards.json.lock").symlink_to(target)                 # the index's own lock
    with pytest.raises(ShardError, match=r"shards.json.lock: is a symbolic link"):
        layout.index.register("images", layout.images, rows=6, config_hash="c")
    assert snapshot(victim) == before                                    # not truncated, not locked


# ---------------------------------------------------------------------------------------------
# HDF5 shards whose datasets lie in other files

def craft_features(shard, victim, how):
    """Rewrite ``shard`` with its 'features' dataset read from ``victim`` (``how``)."""
    with h5py.File(shard, "r") as f:
        data = {k: f[k][()] for k in f}
        attrs = dict(f.attrs)
    feats = data.pop("features")
    outside_h5 = victim / "victim.h5"
    with h5py.File(outside_h5, "w") as g:
        g["features"] = np.full_like(feats, 7)
    raw = victim / "victim.bin"
    raw.write_bytes(np.full_like(feats, 7).tobytes())
    shard.unlink()
    with h5py.File(shard, "w") as f:
        for k, v in data.items():
            f[k] = v
        f.attrs.update(attrs)
        if how == "external raw storage":
            f.create_dataset("features", shape=feats.shape, dtype=feats.dtype,
                             external=[(str(raw), 0, raw.stat().st_size)])
        elif how == "external link":
            f["features"] = h5py.ExternalLink(str(outside_h5), "features")
        elif how == "external link to a text file":
            f["features"] = h5py.ExternalLink(str(victim / "victim.txt"), "features")
        elif how == "virtual dataset":
            layout = h5py.VirtualLayout(shape=feats.shape, dtype=feats.dtype)
            layout[:] = h5py.VirtualSource(str(outside_h5), "features", shape=feats.shape)
            f.create_virtual_dataset("features", layout)
        elif how == "soft link":
            f["stored"] = feats
            f["features"] = h5py.SoftLink("/stored")


@pytest.mark.parametrize("how", ["external raw storage", "external link", "external link to a text file",
                                 "virtual dataset", "soft link"])
def test_hdf5_shard_reading_other_files_is_refused_by_every_reader(handed_over, how, capsys):
    layout, victim = handed_over
    shard = layout.regions("train", 0)
    entry = layout.index.entry("regions", shard)
    craft_features(shard, victim, how)
    layout.index.register("regions", shard, rows=entry.rows, config_hash=entry.config_hash)  # its new hash
    before = snapshot(victim)
    for argv in (["verify", layout.dir], ["inspect", shard]):
        rc, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert f"{shard}: " in lines[0] and "'features'" in lines[0] and "refused" in lines[0], lines
    vocab = Vocabulary.load(layout.vocab)
    for verify in (True, False):  # the trainer's data layer, with and without its re-hash
        with pytest.raises(ShardError, match=rf"{shard.name}: .*'features'.*refused"):
            ShardData(layout.root, "synth", vocab, DataConfig(split="train", verify=verify))
    assert snapshot(victim) == before
