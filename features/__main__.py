"""``python -m features <command>``: bottom-up region features and grid features."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module with ``add_arguments(parser)`` and ``main(args) -> int``, help)
COMMANDS = {
    "extract": ("features.extract", "extract region and/or grid features into shards"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m features", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args._main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
