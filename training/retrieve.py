"""``itmkit retrieve``: search a trained run from the command line, one query per process: a
text against the images of a split, an image against its captions.

    python training/retrieve.py RUN --query "a red car next to a brown dog" [-k 10] [--split test]
    python training/retrieve.py RUN --caption-id N       # a dataset caption: its image is marked
    python training/retrieve.py RUN --image-id N         # top-k captions: the image's own are marked
    python training/retrieve.py RUN --image PATH --weights W   # an image that is not in the dataset
           [--json] [--index flat|ivf|hnsw] [--shortlist RUN2 --topk K [--fuse ALPHA]] [--max-images N]

The command is a thin layer over ``training.searcher.Retriever`` (which ``itmkit serve`` keeps in
memory): queries are prepared as the run's training captions and images were
(``training/queries.py``), two-tower runs search a FAISS index over the split's exported
embeddings (``training/index.py``), cross-attention runs score the gallery block by block or
re-score a two-tower run's top K (``--shortlist RUN2 --topk K``), ordered as ``itmkit evaluate
--shortlist`` orders a query's candidates. The names this module always had (``text_query``,
``IndexSearch``, ``score_rows``, ...) are still importable from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.config import UsageError, add_quiet_argument, add_threads_arguments, positive_int, run_command
from pipeline.shards import ShardError
from training.checkpoint import CheckpointError
from training.index import INDEXES, IndexConfig, build_index, index_dir, ivf_lists, open_index  # noqa: F401
from training.queries import (Query, RetrieveError, caption_query, file_query, image_query,  # noqa: F401
                              query_batch, query_parser, text_query)
from training.run import add_run_arguments
from training.searcher import (SIDES, BlockSearch, IndexSearch, Ranking, Retriever, SearchConfig,  # noqa: F401
                               ShortlistSearch, score_rows, top_k)


# ---------------------------------------------------------------------------------------------
# results

# the table's columns per gallery: (result key, width, number format)
COLUMNS = {"images": (("rank", 4, ""), ("image_id", 8, ""), ("score", 8, ".4f"), ("path", 0, "")),
           "captions": (("rank", 4, ""), ("caption_id", 10, ""), ("image_id", 8, ""), ("score", 8, ".4f"),
                        ("text", 0, ""))}


def format_text(result: dict) -> str:
    q, side = result["query"], result["gallery"]
    what = {"text": "", "caption": f" [caption {q.get('caption_id')} of image {q.get('image_id')}]",
            "image": f" [image {q.get('image_id')}]", "file": f" [{q.get('path')}]"}[q["kind"]]
    lines = [f"query{what}: {q['text']}" if "text" in q else f"query{what}"]
    # each column as wide as its widest cell: ids hashed from file names (ingest.stable_id) take 19 digits
    columns = [(name, width and max(width, len(name), *(len(f"{r[name]:{fmt}}") for r in result["results"])), fmt)
               for name, width, fmt in COLUMNS[side]]
    lines.append("  ".join(f"{name:>{width}}" for name, width, _ in columns))
    lines += ["  ".join(f"{r[name]:>{width}{fmt}}" for name, width, fmt in columns)
              + ("  <- ground truth" if r["ground_truth"] else "") for r in result["results"]]
    if any(not r.get("rescored", True) for r in result["results"]):
        first = next(r["rank"] for r in result["results"] if not r["rescored"])
        lines.append(f"(from rank {first} on: not re-scored, the shortlisting run's order and scores)")
    if result["truth"] and not any(r["ground_truth"] for r in result["results"]):
        truth = ", ".join(map(str, result["truth"]))
        lines.append(f"ground truth ({side} {truth}) not in the top {result['k']}")
    m, sec = result["search"], result["seconds"]
    how = m["method"]
    if how == "shortlist":
        how += f" of {m['shortlist']['method']}'s top {m['topk']}" + (
            f", fused at {m['fuse']:g} (scores: fused)" if m.get("fuse") is not None else "")
    lines.append(f"retrieve: {result['run']} ({result['model']}, {result['checkpoint']}.pt) on "
                 f"{result['dataset']}/{result['split']}: top {len(result['results'])} of "
                 f"{result['gallery_size']} {side} by {how}; {sec['search']:.3f} s per query "
                 f"(load {sec['load']:.1f} s, index {sec['index']:.1f} s)"
                 + "".join(f"; embeddings in {s['export']} (index {s['index']})"
                           for s in (m, m.get("shortlist") or {}) if "export" in s))
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------
# command line

def add_arguments(p: argparse.ArgumentParser) -> None:
    d = IndexConfig()
    p.add_argument("run", help="run folder written by itmkit train")
    q = p.add_argument_group("the query (one of)")
    q.add_argument("--query", help="a text: the top-k images")
    q.add_argument("--caption-id", type=int, help="a caption of the split: the top-k images, its own marked")
    q.add_argument("--image-id", type=int, help="an image of the split: the top-k captions, its own marked")
    q.add_argument("--image", metavar="PATH", help="an image file not in the dataset (needs --weights): "
                   "the top-k captions")
    p.add_argument("-k", type=positive_int, default=10, help="results to show")
    p.add_argument("--split", default="test", help="the split searched")
    p.add_argument("--max-images", type=positive_int, default=None,
                   help="search only the first N images of the split and their captions (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_run_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="images per scoring or export block, captions: 5x")
    add_threads_arguments(p)
    add_quiet_argument(p)
    f = p.add_argument_group("two-tower runs: the FAISS index")
    f.add_argument("--index", choices=list(INDEXES), default=d.kind,
                   help="flat: exact inner product; ivf, hnsw: approximate, for large galleries")
    f.add_argument("--index-dir", default=None,
                   help="where the embeddings are exported and indexes cached (default: RUN/index-SPLIT)")
    f.add_argument("--nlist", type=int, default=d.nlist, help="ivf: clusters, 0 = sqrt(N) (at most N/39)")
    f.add_argument("--nprobe", type=positive_int, default=d.nprobe, help="ivf: clusters searched")
    f.add_argument("--hnsw-m", type=positive_int, default=d.hnsw_m, help="hnsw: links per node")
    f.add_argument("--ef-construction", type=positive_int, default=d.ef_construction,
                   help="hnsw: build-time candidate list")
    f.add_argument("--ef-search", type=positive_int, default=d.ef_search, help="hnsw: search-time candidate list")
    s = p.add_argument_group("cross-attention runs: shortlist and re-score")
    s.add_argument("--shortlist", metavar="RUN2", default=None,
                   help="a two-tower run of the same dataset (its best.pt) whose top --topk the "
                        "run re-scores (default: none, the run scores the whole gallery)")
    s.add_argument("--topk", type=positive_int, default=100, help="shortlist length")
    s.add_argument("--fuse", type=float, default=None, metavar="ALPHA",
                   help="rank the shortlist by ALPHA * run + (1 - ALPHA) * RUN2, both standardised over "
                        "the query's candidates (default: none, the run's scores alone)")
    e = p.add_argument_group("--image: extraction")
    e.add_argument("--weights", default=None,
                   help="extractor weights the dataset was extracted with, or 'random' (default: none)")
    e.add_argument("--seed", type=int, default=None,
                   help="seed of random weights (default: the one the shards record)")


def check_args(args) -> None:
    modes = [m for m in ("query", "caption_id", "image_id", "image") if getattr(args, m) is not None]
    if len(modes) != 1:
        raise UsageError("give one query: --query TEXT, --caption-id N, --image-id N or --image PATH")
    if args.query is not None and not args.query.strip():
        raise UsageError("--query is empty")
    if args.fuse is not None and (args.shortlist is None or not 0.0 <= args.fuse <= 1.0):
        raise UsageError(f"--fuse {args.fuse}: needs --shortlist RUN2 and a weight in [0, 1]")
    if args.image is not None and args.weights is None:
        raise UsageError("--image needs --weights: the extractor weights the dataset was extracted "
                         "with (a file, or 'random')")


def search_config(args) -> SearchConfig:
    return SearchConfig(args.split, args.max_images, args.checkpoint, args.device,
                        IndexConfig(args.index, args.nlist, args.nprobe, args.hnsw_m, args.ef_construction,
                                    args.ef_search),
                        args.index_dir, args.shortlist, args.topk, args.fuse, args.batch_size, args.workers,
                        progress=not args.quiet)


def retrieve(args) -> dict:
    t0 = time.perf_counter()
    r = Retriever(args.run, args.root, search_config(args))
    if args.query is not None:
        query = r.text_query(args.query)
    elif args.caption_id is not None:
        query = r.caption_query(args.caption_id)
    elif args.image_id is not None:
        query = r.image_query(args.image_id)
    else:
        query = r.image_query(args.image, args.weights, args.seed)
    t1 = time.perf_counter()
    r.searcher(query.gallery)
    t2 = time.perf_counter()
    ranking = r.search(query, args.k)
    t3 = time.perf_counter()
    seconds = {"load": t1 - t0, "index": t2 - t1, "search": t3 - t2}
    return {**r.answer(query, ranking, args.k), "seconds": seconds}


ERRORS = (ShardError, CheckpointError, RetrieveError, ValueError, OSError)   # one line, exit 1


def main(argv=None) -> int:
    """``itmkit retrieve`` from Python; errors are raised."""
    return run_command(add_arguments, command, argv)


def command(args) -> int:
    check_args(args)
    result = retrieve(args)
    for note in result["notes"]:
        print(f"retrieve: note: {note}", file=sys.stderr)
    print(json.dumps(result) if args.json else format_text(result))
    return 0


if __name__ == "__main__":   # python training/retrieve.py ...: the same as itmkit retrieve ...
    try:
        sys.exit(main())
    except ERRORS as e:   # one line, exit 1, as itmkit reports them
        sys.exit(f"retrieve: error: {e}")
