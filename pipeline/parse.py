"""`python -m pipeline parse`: not yet available (issue #6)."""

import sys


def add_arguments(p):
    p.add_argument("args", nargs="*", help="not yet available")


def main(args) -> int:
    print("pipeline parse: not yet available (issue #6)", file=sys.stderr)
    return 2
