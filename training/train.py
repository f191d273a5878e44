"""Train an image-text matching model on itmkit shards (not yet available, issue #8)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.parse_args(argv)
    print("train: not yet available (issue #8)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
