"""`itmkit parse`: chunks, shards.json, skipping, resume after a kill, dask."""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from itmkit import cli
from pipeline import parse, shards

TEXTS = [
    "A man riding a horse on a beach.", "Two dogs playing with a red ball.", "",
    "A cat sitting next to a laptop.", "   ", "🙂🙂", "Ein Hund läuft über die Wiese.",
    "A ball thrown by a boy.", "The sky is blue and cloudy.", "A kitchen with a stove and a sink.",
]


def caption_text(i, texts=TEXTS):
    """Captions that repeat TEXTS, made distinct by a number after those with words."""
    base = texts[i % len(texts)]
    return base + (f" {i}" if i >= len(texts) and any(c.isalpha() for c in base) else "")


def write_captions(root, name="toy", n=40):
    rows = [{"caption_id": 1000 + i, "image_id": i // 5, "split": ("train", "val", "test")[i % 3],
             "text": caption_text(i)} for i in range(n)]
    layout = shards.Layout(root, name)
    shards.write_table(layout.captions, rows, "captions")
    return layout


def run(*argv):
    return cli.main(["parse", "--no-progress", *map(str, argv)])


def graphs_table(layout):
    files = layout.index.files("graphs")
    tables = [shards.read_table(f, "graphs") for f in files]
    return pa.concat_tables(tables).replace_schema_metadata(None)


@pytest.fixture(scope="module", autouse=True)
def warm_model():
    parse._model(parse.ParseConfig().model)  # load spaCy once for every in-process run here


def test_parse_writes_and_registers_chunks(tmp_path, capsys):
    layout = write_captions(tmp_path, n=40)
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    out = capsys.readouterr().out
    assert "wrote 3 chunk(s) (40 captions)" in out
    # the bad captions are counted: "" and "   " are empty; the emoji-only one has no objects
    empty = sum(not caption_text(i).strip() for i in range(40))
    emoji = sum(caption_text(i) == "🙂🙂" for i in range(40))
    assert f"{empty} empty" in out and f"{emoji} without objects" in out, out
    entries = layout.index.entries("graphs")
    assert [e.rows for e in entries] == [15, 15, 10]
    assert len({e.config_hash for e in entries}) == 1
    table = graphs_table(layout)
    assert table["caption_id"].to_pylist() == list(range(1000, 1040))  # file order kept
    first = table.slice(0, 1).to_pylist()[0]
    assert first["tokens"][:3] == ["A", "man", "riding"]
    assert {"subject": 0, "predicate": "ride", "object": 1} in first["relations"]
    assert layout.index.verify() == []
    # inspect prints the first graphs readably
    assert cli.main(["inspect", str(layout.graphs(0))]) == 0
    out = capsys.readouterr().out
    assert "first 5 graph(s):" in out and "[1000] A man riding a horse on a beach ." in out
    assert "(man, ride, horse) (man, ride on, beach)" in out and "[1005]" not in out


def test_show_prints_graphs_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run("--show", "Two dogs playing with a red ball.", "A man in a red jacket.") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["[0] Two dogs playing with a red ball.", "  objects    dog (two); ball (red)",
                   "  relations  (dog, play with, ball)",
                   "[1] A man in a red jacket.", "  objects    man; jacket (red)", "  relations  (man, in, jacket)"]
    assert list(tmp_path.iterdir()) == []


def test_dataset_required_without_show(capsys):
    with pytest.raises(SystemExit) as e:
        run("--workers", "1")
    assert e.value.code == 2 and "--dataset" in capsys.readouterr().err


def test_new_parser_rules_rewrite_every_chunk(tmp_path, capsys, monkeypatch):
    from pipeline import sgparse

    layout = write_captions(tmp_path, n=40)
    monkeypatch.setattr(sgparse, "PARSER_VERSION", "1")  # graphs written by the earlier rules
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    old = {e.config_hash for e in layout.index.entries("graphs")}
    monkeypatch.undo()
    capsys.readouterr()
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    assert "wrote 3 chunk(s)" in capsys.readouterr().out
    assert not old & {e.config_hash for e in layout.index.entries("graphs")}


def test_rerun_skips_current_chunks_and_redoes_changed_ones(tmp_path, capsys):
    layout = write_captions(tmp_path, n=40)
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    before = {e.path: e.sha256 for e in layout.index.entries("graphs")}
    capsys.readouterr()
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    assert "wrote 0 chunk(s)" in capsys.readouterr().out
    # change one caption of chunk 1: only chunk 1 is parsed again
    table = shards.read_table(layout.captions).to_pylist()
    table[20]["text"] = "A giraffe eating leaves from a tree."
    shards.write_table(layout.captions, table, "captions")
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15) == 0
    assert "wrote 1 chunk(s) (15 captions)" in capsys.readouterr().out
    after = {e.path: e.sha256 for e in layout.index.entries("graphs")}
    changed = [p for p in after if after[p] != before[p]]
    assert changed == ["text/graphs/graphs-0001.parquet"]
    # another chunk size is another config: the old chunks are removed, never mixed
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 25) == 0
    err = capsys.readouterr().err
    assert "removed 3 graph chunk(s)" in err
    assert [e.rows for e in layout.index.entries("graphs")] == [25, 15]
    assert not layout.graphs(2).exists()
    assert graphs_table(layout).num_rows == 40


def test_single_chunk_option(tmp_path, capsys):
    layout = write_captions(tmp_path, n=40)
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15, "--chunk", 1) == 0
    assert [e.path for e in layout.index.entries("graphs")] == ["text/graphs/graphs-0001.parquet"]
    assert shards.read_table(layout.graphs(1))["caption_id"].to_pylist() == list(range(1015, 1030))
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 15, "--chunk", 3) == 2
    assert "chunk 3 out of range" in capsys.readouterr().err


def test_missing_captions_is_a_clear_error(tmp_path, capsys):
    assert run("--dataset", "nothing", "--root", tmp_path) == 1
    err = capsys.readouterr().err
    assert "captions.parquet" in err and "ingest" in err


def test_resume_after_kill(tmp_path, capsys):
    """Kill a real run once some chunks are registered; the rerun parses only the rest."""
    layout = write_captions(tmp_path, n=300)
    cmd = [sys.executable, "-m", "itmkit", "parse", "--dataset", "toy", "--root", str(tmp_path),
           "--chunk-size", "10", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if layout.index.path.exists() and len(layout.index.entries("graphs")) >= 2:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = {e.path: e.sha256 for e in layout.index.entries("graphs")}
    assert 2 <= len(done) < 30, "the run was not killed part-way"
    for e in layout.index.entries("graphs"):
        shards.read_table(tmp_path / "toy" / e.path, "graphs")  # every registered chunk is whole
    assert run(*cmd[4:]) == 0  # the rerun, in this process
    out = capsys.readouterr().out
    assert f"wrote {30 - len(done)} chunk(s)" in out and f"skipped {len(done)} chunk(s)" in out
    after = {e.path: e.sha256 for e in layout.index.entries("graphs")}
    assert len(after) == 30 and all(after[p] == sha for p, sha in done.items())
    assert graphs_table(layout)["caption_id"].to_pylist() == list(range(1000, 1300))


def test_dask_cluster_gives_the_same_tables_as_one_worker(tmp_path):
    """1 worker (in process) vs an existing 2-worker dask cluster reached with --scheduler."""
    from distributed import LocalCluster

    serial = write_captions(tmp_path / "a", n=60)
    assert run("--dataset", "toy", "--root", tmp_path / "a", "--chunk-size", 10) == 0
    parallel = write_captions(tmp_path / "b", n=60)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert run("--dataset", "toy", "--root", tmp_path / "b", "--chunk-size", 10,
                   "--scheduler", cluster.scheduler_address) == 0
    assert graphs_table(parallel).equals(graphs_table(serial))
    assert len(parallel.index.entries("graphs")) == 6
    assert parallel.index.verify() == []


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, status, says", [
    (f"tcp://127.0.0.1:{free_port()}", 1, "no dask scheduler answers at tcp://127.0.0.1:"),
    ("localhost", 2, "--scheduler localhost: missing port number"),
])
def test_a_wrong_scheduler_address_is_one_line(tmp_path, address, status, says):
    """Nothing listens there, or it is no address: one line naming it, not a traceback; the
    chunks already written stay."""
    layout = write_captions(tmp_path, n=20)
    assert run("--dataset", "toy", "--root", tmp_path, "--chunk-size", 10, "--chunk", 0) == 0
    written = {e.path: e.sha256 for e in layout.index.entries("graphs")}
    env = dict(os.environ, DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")  # instead of 30 s
    r = subprocess.run([sys.executable, "-m", "itmkit", "parse", "--dataset", "toy", "--root", tmp_path,
                        "--shard-size", "10", "--scheduler", address, "--quiet"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == status, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr   # a usage error too: one line naming the help
    assert {e.path: e.sha256 for e in layout.index.entries("graphs")} == written


@pytest.mark.slow
def test_local_workers_option(tmp_path):
    serial = write_captions(tmp_path / "a", n=30)
    assert run("--dataset", "toy", "--root", tmp_path / "a", "--chunk-size", 10) == 0
    parallel = write_captions(tmp_path / "b", n=30)
    assert run("--dataset", "toy", "--root", tmp_path / "b", "--chunk-size", 10, "--workers", 2) == 0
    assert graphs_table(parallel).equals(graphs_table(serial))


def test_inputs_hash_depends_on_ids_and_texts():
    h = parse.inputs_hash([1, 2], ["a dog", "a cat"])
    assert h != parse.inputs_hash([1, 3], ["a dog", "a cat"])
    assert h != parse.inputs_hash([1, 2], ["a dog", "a cat "])
    assert h == parse.inputs_hash([1, 2], ["a dog", "a cat"])
    assert parse.inputs_hash([1], [None]) == parse.inputs_hash([1], [""])
