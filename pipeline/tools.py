"""``inspect`` and ``verify`` look at shards without changing them; ``prune`` removes the shards
that are not in the current plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import UsageError, add_quiet_argument, positive_int
from pipeline.shards import SHARD_FILES, Layout, ShardError, describe


def add_arguments_inspect(p):
    p.add_argument("file", help="a .h5 shard, a .parquet table, a vocab.json or shards.json")
    add_quiet_argument(p)


def command_inspect(args) -> int:
    try:
        print(describe(args.file))
    except (ShardError, FileNotFoundError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    return 0


def add_arguments_verify(p):
    p.add_argument("dataset_dir", help="a dataset folder holding shards.json, e.g. data/coco")
    add_quiet_argument(p)


def command_verify(args) -> int:
    d = Path(args.dataset_dir)
    index = Layout(d.parent, d.name).index
    if not index.path.exists():
        print(f"verify: {index.path}: no shards.json here", file=sys.stderr)
        return 1
    try:
        entries = index.entries()
        problems = index.verify()
    except ShardError as e:
        print(f"verify: {e}", file=sys.stderr)
        return 1
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    print(f"verify: {len(entries)} file(s) in {Path(args.dataset_dir)}, "
          f"{len(entries) - len(problems)} ok, {len(problems)} bad")
    return 1 if problems else 0


def add_arguments_prune(p):
    p.add_argument("dataset_dir", help="a dataset folder holding shards.json, e.g. data/coco")
    add_quiet_argument(p)
    p.add_argument("--kind", required=True, choices=list(SHARD_FILES), help="which shards to prune")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="rows per shard of the current plan, as extract and parse were given it: images "
                        "(regions, grid) or captions (graphs); no default: it decides what is removed")
    # the earlier spelling for graphs, still used by scripts
    p.add_argument("--chunk-size", dest="shard_size", type=positive_int, help=argparse.SUPPRESS)


def command_prune(args) -> int:
    """Remove the shards of one kind outside the current plan, then check that the plan is
    complete: every planned file registered and on disk, all of one config."""
    d = Path(args.dataset_dir)
    layout = Layout(d.parent, d.name)
    size = args.shard_size
    if size is None:
        raise UsageError(f"--kind {args.kind} needs --shard-size N: the plan it keeps")
    try:
        planned = layout.planned(args.kind, size)
        pruned = layout.index.prune(args.kind, planned)
        problems = layout.index.plan_problems(args.kind, planned)
    except ShardError as e:
        print(f"prune: {e}", file=sys.stderr)
        return 1
    for msg in problems:
        print(f"FAIL {msg}", file=sys.stderr)
    shown = ", ".join(pruned.removed[:5]) + (" ..." if len(pruned.removed) > 5 else "")
    state = (f"the plan's {len(planned)} file(s) are registered, of one config" if not problems else
             f"the plan of {len(planned)} file(s) is not complete: {len(problems)} problem(s) above")
    print(f"prune {layout.name} {args.kind}: removed {len(pruned.removed)} shard(s) outside the plan"
          f"{f' ({shown})' if shown else ''}, {len(pruned.temporary)} temporary file(s) of writers that "
          f"are gone; {len(pruned.busy)} left because another process is writing them; {state}")
    return 1 if problems else 0
