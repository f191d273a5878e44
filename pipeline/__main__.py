"""``python -m pipeline <command>``: the data-side command line of itmkit."""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__

# command name -> (module that implements it, one-line help). Each module has
# ``add_arguments(parser)`` and ``main(args) -> int``; modules are imported only when used.
COMMANDS = {
    "demo": ("pipeline.demo", "generate the built-in demo dataset"),
    "ingest": ("pipeline.ingest", "read a dataset manifest into captions.parquet + images.parquet"),
    "import-precomp": ("pipeline.precomp", "convert SCAN-style precomp features into itmkit shards"),
    "parse": ("pipeline.parse", "parse captions into scene graphs (spaCy, dask)"),
    "vocab": ("pipeline.vocab", "build the vocabulary from the train split"),
    "inspect": ("pipeline.tools", "print the schema, counts and attributes of a shard"),
    "verify": ("pipeline.tools", "re-hash a dataset folder against its shards.json"),
    "prune": ("pipeline.tools", "remove the shards of a kind that are not in the current plan"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("--version", action="version", version=f"itmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        getattr(mod, "add_arguments_" + name.replace("-", "_"), getattr(mod, "add_arguments", None))(p)
        p.set_defaults(_main=getattr(mod, "main_" + name.replace("-", "_"), getattr(mod, "main", None)))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args._main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
