"""`python -m pipeline ingest`: not yet available (issue #4)."""

import sys


def add_arguments(p):
    p.add_argument("args", nargs="*", help="not yet available")


def main(args) -> int:
    print("pipeline ingest: not yet available (issue #4)", file=sys.stderr)
    return 2
