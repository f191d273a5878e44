"""``itmkit parse``: captions.parquet -> scene-graph chunks, in parallel with dask.

Chunk k holds caption rows [k * chunk_size, (k + 1) * chunk_size) of captions.parquet, in file
order, at ``Layout.graphs(k)``. Each chunk is written atomically and registered in shards.json
as soon as it is done, so a rerun after a kill parses only the chunks that are missing, stale
(another parser config) or whose captions changed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline import sgparse, shards
from pipeline.config import (UsageError, add_dataset_argument, add_quiet_argument, add_root_argument,
                             positive_int, resolve_root)

LONG_CAPTION_TOKENS = 200  # captions longer than this are parsed, and counted in the summary


class SchedulerError(RuntimeError):
    """The dask scheduler named by --scheduler cannot be reached."""


ERRORS = (SchedulerError,)   # reported by `itmkit parse` as one line, exit status 1


@dataclass
class ParseConfig:
    model: str = sgparse.DEFAULT_MODEL
    chunk_size: int = 5000
    batch_size: int = 256  # nlp.pipe batch; does not change the output, so not in the hash

    def identity(self) -> dict:
        """What the graphs depend on; its hash is the config hash of every chunk."""
        import spacy

        model = sgparse.resolve_model(self.model)
        return {"parser": sgparse.PARSER_VERSION, "model": model,
                "model_version": sgparse.model_version(model), "spacy": spacy.__version__,
                "chunk_size": self.chunk_size}


@dataclass
class ChunkTask:
    root: str
    dataset: str
    chunk: int
    caption_ids: list
    texts: list
    config_hash: str
    inputs_hash: str


def inputs_hash(caption_ids, texts) -> str:
    h = hashlib.sha256()
    for cid, text in zip(caption_ids, texts):
        h.update(f"{cid}\x00{text if text is not None else ''}\x01".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def _model(name: str):
    # one pipeline per process: dask workers keep it between the chunks they parse
    return sgparse.load_model(name)


def parse_chunk(task: ChunkTask, cfg: ParseConfig, wait: bool = True) -> dict:
    """Parse one chunk, write it, register it; return its counts. Runs in a dask worker.

    The chunk is written under its claim: when another process holds it, this returns at once
    (``state`` "busy", with ``wait=False``) or waits for it and then finds the chunk current
    ("meanwhile"); otherwise the chunk is parsed ("written")."""
    start = time.perf_counter()
    layout = shards.Layout(Path(task.root).absolute(), task.dataset)
    path = layout.graphs(task.chunk)
    counts = {"chunk": task.chunk, "rows": 0, "empty": 0, "no_objects": 0, "long": 0}
    with shards.claim(path, wait=wait) as held:
        if not held:
            return dict(counts, state="busy", seconds=0.0)
        if layout.index.is_valid("graphs", path, task.config_hash, task.inputs_hash):
            return dict(counts, state="meanwhile", seconds=time.perf_counter() - start)
        nlp = _model(cfg.model)
        texts = [t if isinstance(t, str) else "" for t in task.texts]
        rows = []
        for cid, graph in zip(task.caption_ids, sgparse.parse_texts(nlp, texts, cfg.batch_size)):
            rows.append(graph.row(cid))
            n = len(graph.tokens)
            counts["empty"] += n == 0
            counts["no_objects"] += n > 0 and not graph.objects
            counts["long"] += n > LONG_CAPTION_TOKENS
        shards.write_table(path, rows, "graphs", metadata={"config": cfg.identity(), "chunk": task.chunk})
        extra = {k: counts[k] for k in ("empty", "no_objects", "long")}
        layout.index.register("graphs", path, rows=len(rows), config_hash=task.config_hash,
                              inputs_hash=task.inputs_hash, extra=extra)
    return dict(counts, rows=len(rows), state="written", seconds=time.perf_counter() - start)


def plan(layout: shards.Layout, cfg: ParseConfig, chunks: list[int] | None = None):
    """(all chunk tasks in range, the ones to run, config hash, number of chunks)."""
    table = shards.read_table(layout.captions, columns=["caption_id", "text"])
    ids = table["caption_id"].to_pylist()
    texts = table["text"].to_pylist()
    chash = shards.config_hash(cfg.identity())
    n_chunks = len(layout.plan("graphs", {None: len(ids)}, cfg.chunk_size))
    wanted = range(n_chunks) if chunks is None else chunks
    tasks, todo = [], []
    for k in wanted:
        if not 0 <= k < n_chunks:
            raise ValueError(f"chunk {k} out of range: {layout.captions} has {len(ids)} captions, "
                             f"{n_chunks} chunk(s) of {cfg.chunk_size}")
        sl = slice(k * cfg.chunk_size, (k + 1) * cfg.chunk_size)
        task = ChunkTask(str(layout.root), layout.name, k, ids[sl], texts[sl], chash,
                         inputs_hash(ids[sl], texts[sl]))
        tasks.append(task)
        status = layout.index.status("graphs", layout.graphs(k), chash, task.inputs_hash)
        if status == "altered":
            print(f"parse: {layout.graphs(k)} differs from shards.json (altered); rewriting it",
                  file=sys.stderr)
        if status != "current":
            todo.append(task)
    return tasks, todo, chash, n_chunks


def drop_stale(layout: shards.Layout, chash: str, n_chunks: int) -> list[str]:
    """Forget (and delete) graph chunks of another config, or past the last chunk: they must
    never be read together with the current ones."""
    planned = [layout.graphs(k) for k in range(n_chunks)]
    return layout.index.prune("graphs", planned, config_hash=chash).removed


def run_tasks(todo: list[ChunkTask], cfg: ParseConfig, workers: int = 1,
              scheduler: str | None = None, progress: bool = True, client=None,
              wait: bool = True) -> list[dict]:
    """Parse the chunks here (one worker, no scheduler) or on a dask cluster: a local one of
    ``workers`` processes, the one at ``scheduler``, or the one of an open ``client``. With
    ``wait=False`` a chunk another process is writing comes back with state "busy"."""
    bar = tqdm(total=sum(len(t.caption_ids) for t in todo), unit="caption", disable=not progress,
               desc="parse", file=sys.stderr)
    results = []
    if not todo:
        bar.close()
        return results
    if client is None and scheduler is None and workers <= 1:
        for task in todo:
            results.append(parse_chunk(task, cfg, wait))
            bar.update(results[-1]["rows"])
        bar.close()
        return results

    from distributed import LocalCluster, as_completed

    cluster = None if scheduler or client else LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        with contextlib.ExitStack() as stack:
            if client is None:
                client = stack.enter_context(connect(scheduler or cluster, scheduler))
            futures = [client.submit(parse_chunk, t, cfg, wait, pure=False,
                                     key=f"parse-{t.chunk}-{t.inputs_hash}-{wait}") for t in todo]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(results[-1]["rows"])
    finally:
        bar.close()
        if cluster is not None:
            cluster.close()
    return sorted(results, key=lambda r: r["chunk"])


def connect(address, scheduler: str | None):
    """A dask client of ``address`` (a local cluster, or the ``scheduler`` address); a
    ``scheduler`` address that does not work is one line, not distributed's 50-line traceback."""
    from distributed import Client

    try:
        return Client(address)
    except ValueError as e:   # not an address: "missing port number", "unknown address scheme"
        if scheduler is None:
            raise
        raise UsageError(f"--scheduler {scheduler}: {e}") from None
    except OSError as e:      # nothing answers there (TimeoutError is an OSError)
        if scheduler is None:
            raise
        raise SchedulerError(f"no dask scheduler answers at {scheduler} ({e}); start one "
                             f"(`dask scheduler`) or pass its address") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset_argument(p, required=False,
                         help="dataset name (folder under the data root); required unless --show")
    p.add_argument("--show", nargs="+", metavar="CAPTION",
                   help="print the graph of each CAPTION (objects with their attributes, relations "
                        "as triples) and write nothing")
    add_root_argument(p)
    p.add_argument("--workers", type=positive_int, default=1,
                   help="local dask worker processes (1: parse in this process)")
    p.add_argument("--scheduler", default=None,
                   help="address of an existing dask scheduler (tcp://host:8786); workers must "
                        "see the same data root")
    p.add_argument("--shard-size", dest="chunk_size", type=positive_int, default=ParseConfig.chunk_size,
                   help="captions per graph shard (part of the config hash)")
    # the earlier spelling, still used by scripts
    p.add_argument("--chunk-size", dest="chunk_size", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, action="append", default=None,
                   help="parse only chunk K (repeatable); for schedulers that scatter chunks")
    p.add_argument("--batch-size", type=positive_int, default=ParseConfig.batch_size, help="nlp.pipe batch size")
    p.add_argument("--model", default=sgparse.DEFAULT_MODEL,
                   help=f"spaCy model name or path (falling back to {', '.join(sgparse.FALLBACK_MODELS)})")
    add_quiet_argument(p)


def show(captions: list[str], model: str) -> int:
    """``--show``: parse the captions given on the command line and print their graphs."""
    try:
        nlp = sgparse.load_model(model)
    except OSError as e:
        print(f"parse: {e}", file=sys.stderr)
        return 2
    for i, (text, graph) in enumerate(zip(captions, sgparse.parse_texts(nlp, captions))):
        print("\n".join(sgparse.graph_lines(graph.row(i), text)))
    return 0


def command(args) -> int:
    if args.show:
        return show(args.show, args.model)
    if not args.dataset:
        raise UsageError("the following arguments are required: --dataset (or --show CAPTION ...)")
    # absolute, so that paths registered in shards.json resolve from any working directory
    layout = shards.Layout(resolve_root(args.root).absolute(), args.dataset)
    cfg = ParseConfig(model=args.model, chunk_size=args.chunk_size, batch_size=args.batch_size)
    try:
        tasks, todo, chash, n_chunks = plan(layout, cfg, args.chunk)
    except shards.ShardError as e:
        made_by = "" if layout.captions.exists() else " (made by `itmkit ingest`, `demo` or `import-precomp`)"
        print(f"parse: {e}{made_by}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"parse: {e}", file=sys.stderr)
        return 2
    dropped = drop_stale(layout, chash, n_chunks) if args.chunk is None else []
    if dropped:
        print(f"parse: removed {len(dropped)} graph chunk(s) written with another config or past "
              f"the last chunk: {', '.join(dropped[:5])}{' ...' if len(dropped) > 5 else ''}",
              file=sys.stderr)
    start = time.perf_counter()
    try:
        results = run_tasks(todo, cfg, args.workers, args.scheduler, progress=not args.quiet, wait=False)
        busy = {r["chunk"] for r in results if r["state"] == "busy"}
        if busy:  # another process is writing them: wait for it, then take what is left
            print(f"parse: {len(busy)} chunk(s) are being written by another process; waiting for them",
                  file=sys.stderr)
            results += run_tasks([t for t in todo if t.chunk in busy], cfg, args.workers, args.scheduler,
                                 progress=not args.quiet)
    except shards.ShardError as e:
        print(f"parse: error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    written = [r for r in results if r["state"] == "written"]
    meanwhile = sum(r["state"] == "meanwhile" for r in results)
    rows = sum(r["rows"] for r in written)
    totals = {k: sum(r[k] for r in written) for k in ("empty", "no_objects", "long")}
    rate = f", {rows / seconds:,.0f} captions/s" if rows else ""
    other = f" ({meanwhile} written meanwhile by another process)" if meanwhile else ""
    print(f"parse {args.dataset}: wrote {len(written)} chunk(s) ({rows:,} captions) to "
          f"{layout.graphs(0).parent} in {seconds:.1f}s{rate}; skipped {len(tasks) - len(written)} "
          f"chunk(s) already current{other} (config {chash}); {totals['empty']} empty, "
          f"{totals['no_objects']} without objects, {totals['long']} over {LONG_CAPTION_TOKENS} tokens")
    return 0
