"""``python -m features extract``: bottom-up region features and grid features."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m features", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("extract", help="extract region and/or grid features (not yet available, issue #5)")
    parser.parse_args(argv)
    print("features extract: not yet available (issue #5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
