"""Round trips, atomicity, corruption detection and multi-process reads of pipeline/shards.py."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pipeline import shards
from pipeline.shards import (GridShard, Layout, RegionShard, Regions, ShardError, Vocabulary,
                             read_table, read_vocab, write_grid, write_regions, write_table,
                             write_vocab)


def make_regions(rng, counts, dim=2048):
    out = []
    for i, n in enumerate(counts):
        xy = rng.uniform(0, 50, (n, 2)).astype(np.float32)
        out.append(Regions(
            image_id=1000 + i, image_hw=(120 + i, 160 + i),
            features=rng.standard_normal((n, dim)).astype(np.float16),
            boxes=np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2))], 1).astype(np.float32),
            obj_labels=rng.integers(0, 1600, n), obj_scores=rng.random(n),
            attr_labels=rng.integers(0, 400, n), attr_scores=rng.random(n)))
    return out


def assert_same(a: Regions, b: Regions):
    assert a.image_id == b.image_id and tuple(a.image_hw) == tuple(b.image_hw)
    for name in shards.REGION_FIELDS:
        np.testing.assert_array_equal(a.column(name), b.column(name))


@pytest.mark.parametrize("counts,chunk", [([0, 100, 3, 0, 57], 100), ([36] * 7, 36)])
def test_region_round_trip(tmp_path, counts, chunk):
    images = make_regions(np.random.default_rng(0), counts)
    path = write_regions(tmp_path / "r.h5", images, boxes_per_chunk=chunk, attrs={"config": {"k": 1}})
    shard = RegionShard(path)
    assert len(shard) == len(counts)
    np.testing.assert_array_equal(shard.box_counts(), counts)
    for i, want in enumerate(images):
        assert_same(shard.get(i), want)
    assert shard.attrs["config"] == {"k": 1}
    assert "software" in shard.attrs and "created" not in shard.attrs  # the time is in shards.json
    assert not (tmp_path / "r.h5.tmp").exists()


@pytest.mark.parametrize("compression", ["gzip", "lzf"])
def test_compressed_region_round_trip(tmp_path, compression):
    images = make_regions(np.random.default_rng(10), [36, 36, 0, 36])
    shard = RegionShard(write_regions(tmp_path / "r.h5", images, compression=compression))
    assert shard.file["features"].compression == compression
    for i, want in enumerate(images):
        assert_same(shard.get(i), want)


def test_fixed_k_reads_touch_one_chunk(tmp_path):
    path = write_regions(tmp_path / "r.h5", make_regions(np.random.default_rng(1), [36] * 4))
    f = RegionShard(path).file
    assert f["features"].chunks == (36, 2048)
    off = RegionShard(path).index[2]
    assert all(off[i] % 36 == 0 for i in range(len(off)))


def test_unknown_labels_and_boxes(tmp_path):
    r = Regions(7, (10, 10), np.ones((36, 2048), np.float16), np.full((36, 4), np.nan, np.float32))
    got = RegionShard(write_regions(tmp_path / "p.h5", [r])).get(0)
    assert np.isnan(got.boxes).all() and (got.obj_labels == -1).all() and np.isnan(got.attr_scores).all()


def test_other_feature_widths(tmp_path):
    images = make_regions(np.random.default_rng(12), [3, 0, 5], dim=64)
    shard = RegionShard(write_regions(tmp_path / "r.h5", images, feature_dim=64))
    for i, want in enumerate(images):
        assert_same(shard.get(i), want)


def test_region_writer_rejects_bad_shapes(tmp_path):
    bad = Regions(1, (5, 5), np.zeros((3, 100), np.float16), np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="image 1"):
        write_regions(tmp_path / "bad.h5", [bad])
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.h5.tmp").exists()


def test_grid_round_trip(tmp_path):
    feats = np.random.default_rng(2).standard_normal((3, 49, 64)).astype(np.float16)
    g = GridShard(write_grid(tmp_path / "g.h5", [5, 6, 7], feats, (7, 7), attrs={"note": "x"}))
    assert g.grid_hw == (7, 7) and list(g.image_ids) == [5, 6, 7]
    np.testing.assert_array_equal(g.get(1), feats[1])
    with pytest.raises(ValueError, match="grid"):
        write_grid(tmp_path / "h.h5", [1], feats, (7, 7))


def test_tables_round_trip(tmp_path):
    caps = {"caption_id": [1, 2], "image_id": [9, 9], "split": ["train", "train"], "text": ["a b", "é ☃"]}
    write_table(tmp_path / "c.parquet", caps, "captions")
    assert read_table(tmp_path / "c.parquet", "captions").to_pydict() == caps
    graph = [{"caption_id": 1, "tokens": ["a", "man", "on", "a", "horse"], "lemmas": ["a", "man", "on", "a", "horse"],
              "objects": [{"head": "man", "span": "a man", "token_index": 1},
                          {"head": "horse", "span": "a horse", "token_index": 4}],
              "attributes": [{"object": 0, "attribute": "tall"}],
              "relations": [{"subject": 0, "predicate": "on", "object": 1}]},
             {"caption_id": 2, "tokens": [], "lemmas": [], "objects": [], "attributes": [], "relations": []}]
    write_table(tmp_path / "g.parquet", graph, "graphs")
    assert read_table(tmp_path / "g.parquet", "graphs").to_pylist() == graph
    with pytest.raises(ShardError, match="not a graphs table"):
        read_table(tmp_path / "c.parquet", "graphs")
    with pytest.raises(ValueError, match="lacks column"):
        write_table(tmp_path / "x.parquet", {"caption_id": [1]}, "captions")


def test_vocab_round_trip_and_encode(tmp_path):
    vocab = {"words": [[s, 0] for s in shards.VOCAB_SPECIALS] + [["dog", 5], ["man", 3]],
             "min_count": 2, "predicates": [["on", 4]], "attributes": [["red", 2]]}
    write_vocab(tmp_path / "v.json", vocab)
    v = Vocabulary.load(tmp_path / "v.json")
    assert v.encode(["Dog", "cat"]) == [1, 4, 3, 2]
    assert v.decode([1, 4, 5, 2]) == ["dog", "man"]
    assert v.predicate_id("on") == 1 and v.predicate_id("under") == 0 and v.attribute_id("RED") == 1
    assert read_vocab(tmp_path / "v.json")["min_count"] == 2
    with pytest.raises(ValueError, match="must start with"):
        write_vocab(tmp_path / "w.json", dict(vocab, words=[["dog", 1]]))


def test_truncated_files_name_the_file(tmp_path):
    path = write_regions(tmp_path / "r.h5", make_regions(np.random.default_rng(3), [36] * 20))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="r.h5"):
        RegionShard(path).get(19)
    t = write_table(tmp_path / "c.parquet", {"caption_id": [1], "image_id": [1], "split": ["a"], "text": ["b"]}, "captions")
    t.write_bytes(t.read_bytes()[:-20])
    with pytest.raises(ShardError, match="c.parquet"):
        read_table(t)
    (tmp_path / "v.json").write_text('{"words": [["<pad>", 0]')
    with pytest.raises(ShardError, match="v.json"):
        read_vocab(tmp_path / "v.json")


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from pipeline.shards import RegionShardWriter, Regions
    w = RegionShardWriter(sys.argv[1])
    for i in range(10_000):
        w.append(Regions(i, (10, 10), np.ones((36, 2048), np.float16), np.zeros((36, 4), np.float32)))
        if i == 20:
            print("writing", flush=True)
    w.close()
""")


def test_killed_writer_leaves_previous_file_intact(tmp_path):
    path = write_regions(tmp_path / "r.h5", make_regions(np.random.default_rng(4), [5, 6]))
    before = shards.sha256_file(path)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert shards.sha256_file(path) == before
    assert len(RegionShard(path)) == 2
    # the next writer replaces the stale temporary file
    write_regions(path, make_regions(np.random.default_rng(5), [1]))
    assert len(RegionShard(path)) == 1 and not (tmp_path / "r.h5.tmp").exists()


def test_index_register_valid_stale_and_verify(tmp_path):
    ds = tmp_path / "demo"
    a = write_regions(ds / "regions" / "a.h5", make_regions(np.random.default_rng(6), [2, 3]))
    b = write_regions(ds / "regions" / "b.h5", make_regions(np.random.default_rng(7), [4]))
    index = Layout(tmp_path, "demo").index
    index.register("regions", a, rows=2, config_hash="c1", inputs_hash="i1")
    index.register("regions", "regions/b.h5", rows=1, config_hash="c2")
    assert index.is_valid("regions", a, "c1", "i1")
    assert not index.is_valid("regions", a, "c1", "other-inputs")
    assert not index.is_valid("regions", a, "c9", "i1")
    assert [e.path for e in index.stale("regions", "c1")] == ["regions/b.h5"]
    with pytest.raises(ShardError, match="another config"):
        index.files("regions", config_hash="c1")
    assert index.files("regions") == [a, b]
    assert index.verify() == []

    raw = bytearray(a.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    a.write_bytes(bytes(raw))
    b.write_bytes(b.read_bytes()[:-100])
    problems = index.verify()
    assert any("a.h5" in p and "sha256" in p for p in problems)
    assert any("b.h5" in p and "truncated" in p for p in problems)
    assert not index.is_valid("regions", b, "c2")

    from itmkit.cli import main
    assert main(["verify", str(ds)]) == 1
    b.unlink()
    assert any("missing" in p for p in index.verify())
    with pytest.raises(ValueError, match="unknown shard kind"):
        index.register("nope", a, rows=1, config_hash="x")


def test_index_accepts_paths_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_regions("d/demo/regions/a.h5", make_regions(np.random.default_rng(11), [1]))
    index = Layout("d", "demo").index
    index.register("regions", "d/demo/regions/a.h5", rows=1, config_hash="c")
    index.register("regions", "regions/a.h5", rows=1, config_hash="c")
    assert [e.path for e in index.entries()] == ["regions/a.h5"]
    assert index.is_valid("regions", "d/demo/regions/a.h5", "c") and index.verify() == []
    with pytest.raises(ValueError, match="not inside"):
        index.register("regions", tmp_path / "elsewhere.h5", rows=1, config_hash="c")


def test_concurrent_registration(tmp_path):
    ds = tmp_path / "demo"
    for i in range(8):
        (ds / f"f{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (ds / f"f{i}.bin").write_bytes(bytes([i]) * 10)
    code = ("import sys; from pipeline.shards import Layout; "
            "Layout(sys.argv[1], 'demo').index.register('graphs', 'f' + sys.argv[2] + '.bin', rows=1, config_hash='h')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(i)]) for i in range(8)]
    assert all(p.wait() == 0 for p in procs)
    assert sorted(e.path for e in Layout(tmp_path, "demo").index.entries("graphs")) == [f"f{i}.bin" for i in range(8)]


class _Reads(torch.utils.data.Dataset):
    def __init__(self, shard):
        self.shard = shard

    def __len__(self):
        return len(self.shard)

    def __getitem__(self, i):
        return torch.from_numpy(self.shard.get(i).features.astype(np.float32)).sum(0)


def test_multi_worker_reads_match(tmp_path):
    path = write_regions(tmp_path / "r.h5", make_regions(np.random.default_rng(8), [36] * 24))
    shard = RegionShard(path)
    direct = torch.stack([_Reads(shard)[i] for i in range(len(shard))])  # opens in this process first
    loader = torch.utils.data.DataLoader(_Reads(shard), batch_size=4, num_workers=2,
                                         multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), direct)


def test_describe_and_cli(tmp_path, capsys):
    path = write_regions(tmp_path / "r.h5", make_regions(np.random.default_rng(9), [2, 0]))
    from itmkit.cli import main
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "features" in out and "(2, 2048)" in out and "boxes/image  min 0" in out
    assert main(["inspect", str(tmp_path / "missing.h5")]) == 1


# ---------------------------------------------------------------------------------------------
# Layout: the only code that names shards; prune; resolving a run's config hashes

def test_layout_builds_and_parses_shard_names(tmp_path):
    layout = shards.Layout(tmp_path, "demo")
    assert layout.regions("val", 3) == tmp_path / "demo" / "regions" / "regions-val-0003.h5"
    assert layout.graphs(12345).name == "graphs-12345.parquet"
    for kind, split in (("regions", "my-split"), ("grid", "test"), ("graphs", None)):
        for chunk in (0, 7, 10000):
            path = layout.shard(kind, split, chunk)
            assert layout.parse(path) == shards.ShardName(kind, split, chunk)
            assert layout.parse(path.relative_to(layout.dir).as_posix(), kind).chunk == chunk
    assert layout.parse("regions/regions-train-0001.h5.tmp") is None
    assert layout.parse("regions/a.h5") is None and layout.parse("grid/grid-train-0001.h5", "regions") is None
    assert layout.pattern("grid") == str(tmp_path / "demo" / "grid" / "grid-{split}-{chunk}.h5")
    assert [p.name for p in layout.plan("grid", {"train": 5, "test": 2}, 2)] == \
        ["grid-test-0000.h5", "grid-train-0000.h5", "grid-train-0001.h5", "grid-train-0002.h5"]
    with pytest.raises(ValueError, match="named by split"):
        layout.shard("graphs", "train", 0)


def test_only_layout_knows_shard_names():
    """No other code builds or parses a dataset shard's file name (a regex, an f-string)."""
    import re
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    naming = re.compile(r"(regions|grid)-\{[^}]*\}-\{|graphs-\{|\{kind\}-\{")
    offenders = []
    for p in repo.rglob("*"):
        if (p.suffix in (".py", ".smk") or p.name == "Snakefile") and not {"tests", ".venv"} & set(p.parts):
            lines = p.read_text(errors="ignore").splitlines()
            offenders += [f"{p.relative_to(repo)}: {line.strip()}" for line in lines
                          if naming.search(line) and not re.search(r"\.(log|tsv)\b", line)]
    assert [o.split(":")[0] for o in offenders] == ["pipeline/shards/layout.py"] * 3, offenders


def _register_shard(layout, kind, split, chunk, config="c1"):
    path = layout.shard(kind, split, chunk)
    write_regions(path, make_regions(np.random.default_rng(chunk), [1]))
    layout.index.register(kind, path, rows=1, config_hash=config)
    return path


def test_prune_removes_shards_outside_the_plan_and_reports_them(tmp_path, capsys):
    layout = shards.Layout(tmp_path, "demo")
    write_table(layout.images, [dict(image_id=i, path=f"/x/{i}.png", split="train", width=8, height=8)
                                for i in range(4)], "images")
    kept = [_register_shard(layout, "regions", "train", k) for k in (0, 1)]
    old = [_register_shard(layout, "regions", "train", k) for k in (2, 3)]
    orphan = layout.regions("train", 5)
    orphan.write_bytes(b"unregistered leftover")
    dead = orphan.with_name(orphan.name + ".tmp")          # an older version's temporary file
    dead.write_bytes(b"half")
    busy = _register_shard(layout, "regions", "train", 4)
    from itmkit.cli import main
    with shards.claim(busy) as held:
        assert held
        rc = main(["prune", str(layout.dir), "--kind", "regions", "--shard-size", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "removed 3 shard(s) outside the plan (regions/regions-train-0002.h5, " in out
    assert "1 temporary file(s)" in out and "1 left because another process is writing" in out
    assert all(p.exists() for p in kept + [busy]) and not any(p.exists() for p in old + [orphan, dead])
    assert sorted(e.path for e in layout.index.entries("regions")) == \
        ["regions/regions-train-0000.h5", "regions/regions-train-0001.h5", "regions/regions-train-0004.h5"]
    # a plan that the shards do not cover: reported, exit 1
    assert main(["prune", str(layout.dir), "--kind", "regions", "--shard-size", "1"]) == 1
    err = capsys.readouterr().err
    assert "regions-train-0002.h5: not registered" in err and "regions-train-0003.h5" in err
    with pytest.raises(SystemExit) as e:   # the plan is not guessed: a usage error
        main(["prune", str(layout.dir), "--kind", "regions"])
    assert e.value.code == 2


def test_run_config_hashes_are_resolved_by_one_pure_function(tmp_path):
    layout = shards.Layout(tmp_path, "demo")
    _register_shard(layout, "regions", "train", 0, "a")
    _register_shard(layout, "regions", "val", 0, "a")
    _register_shard(layout, "regions", "test", 0, "b")
    _register_shard(layout, "grid", "train", 0, "g")
    index = layout.index
    assert index.splits("regions") == {"train", "val", "test"}

    def hashes(kinds, splits):
        return shards.resolve_config_hashes(index.read_set(kinds, splits))
    assert hashes(["regions", "grid"], ["train"]) == {"regions": "a", "grid": "g"}
    with pytest.raises(ShardError, match="no grid registered for split 'val'"):
        hashes(["grid"], ["val"])
    with pytest.raises(ShardError, match="several configs"):
        hashes(["regions"], ["train", "test"])
    entries = index.read_set(["regions"], ["test"])
    assert shards.resolve_config_hashes(entries) == {"regions": "b"}
    with pytest.raises(ShardError, match="expects regions shards of config a"):
        shards.resolve_config_hashes(entries, {"regions": "a", "grid": "unused"})


def test_files_of_earlier_versions_stay_readable(tmp_path):
    """Shards with a `created` attribute, an index entry as earlier versions wrote it, and the
    `<name>.tmp` an earlier writer left behind."""
    layout = shards.Layout(tmp_path, "demo")
    path = write_regions(layout.regions("train", 0), make_regions(np.random.default_rng(13), [2]),
                         attrs={"created": "2026-11-20T10:00:00+00:00"})
    (path.parent / (path.name + ".tmp")).write_bytes(b"half")
    entry = {"kind": "regions", "path": "regions/regions-train-0000.h5", "sha256": shards.sha256_file(path),
             "size": path.stat().st_size, "rows": 1, "config_hash": "c", "inputs_hash": "i",
             "version": "0.1.0", "created": "2026-11-20T10:00:00+00:00", "extra": {}}
    shards.write_json(layout.index.path, {"dataset": "demo", "itmkit_version": "0.1.0",
                                          "kinds": {"regions": [entry]}})
    assert RegionShard(path).attrs["created"] and len(RegionShard(path)) == 1
    assert layout.index.is_valid("regions", path, "c", "i") and layout.index.verify() == []
    assert shards.resolve_config_hashes(layout.index.read_set(["regions"], ["train"])) == {"regions": "c"}
    assert layout.index.prune("regions", [path]).temporary == ["regions/regions-train-0000.h5.tmp"]
