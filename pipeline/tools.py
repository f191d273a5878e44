"""``inspect`` and ``verify``: look at shards without changing them."""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.shards import ShardError, ShardIndex, describe


def add_arguments_inspect(p):
    p.add_argument("file", help="a .h5 shard, a .parquet table, a vocab.json or shards.json")


def main_inspect(args) -> int:
    try:
        print(describe(args.file))
    except (ShardError, FileNotFoundError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 1
    return 0


def add_arguments_verify(p):
    p.add_argument("dataset_dir", help="a dataset folder holding shards.json, e.g. data/coco")


def main_verify(args) -> int:
    index = ShardIndex(args.dataset_dir)
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
