"""``itmkit COMMAND``: every command of itmkit, from a dataset to an evaluated run.

Each command is a module with ``add_arguments(parser)`` and ``command(args) -> int`` (or
``add_arguments_NAME`` and ``command_NAME`` where one module serves several commands), imported
only when its command runs: ``itmkit ingest --help`` does not import torch. A module may name
in ``ERRORS`` the exceptions it reports as one line (exit 1); a ``UsageError`` exits 2 with one
line, as argparse's own errors do. A command with ``--threads`` runs with the thread default
(``pipeline.config.command_threads``).
Adding a command is one line in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipeline import __version__
from pipeline.config import ArgumentParser, HelpFormatter, UsageError, command_threads

# command -> (module, one-line help), in the order a dataset goes through them
COMMANDS = {
    "demo": ("pipeline.demo", "generate the built-in demo dataset"),
    "ingest": ("pipeline.ingest", "read a dataset manifest into captions.parquet + images.parquet"),
    "import-precomp": ("pipeline.precomp", "convert SCAN-style precomp features into itmkit shards"),
    "parse": ("pipeline.parse", "parse captions into scene graphs (spaCy, dask)"),
    "vocab": ("pipeline.vocab", "build the vocabulary from the train split"),
    "extract": ("features.extract", "extract region and/or grid features into shards"),
    "train": ("training.train", "train a model on a dataset's shards"),
    "evaluate": ("training.evaluate", "Recall@K and rSum of a run, as the literature reports them"),
    "retrieve": ("training.retrieve", "the top-k images of a text, or captions of an image, for a run"),
    "serve": ("training.serve", "a web page and JSON API of runs' retrievals, each run loaded once"),
    "report": ("training.report", "one self-contained HTML report of one or several runs"),
    "plot": ("training.plot", "draw the loss and rSum curves of runs"),
    "verify": ("pipeline.tools", "re-hash a dataset folder against its shards.json"),
    "inspect": ("pipeline.tools", "print the schema, counts and attributes of a shard"),
    "prune": ("pipeline.tools", "remove the shards of a kind that are not in the current plan"),
    "upgrade": ("training.checkpoint", "convert the checkpoints of an earlier itmkit version"),
}


def _function(module, stem: str, command: str):
    return getattr(module, f"{stem}_{command.replace('-', '_')}", None) or getattr(module, stem)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The parser of every command; the arguments of ``commands`` (default: all) are added,
    which imports their modules."""
    parser = ArgumentParser(
        prog="itmkit", description="image-text matching: datasets, features, scene graphs, training, evaluation",
        epilog="`itmkit COMMAND --help` lists a command's options. `python training/train.py`\n"
               "(evaluate.py, report.py, plot.py, retrieve.py) runs the same command.",
        formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"itmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if commands is None or name in commands:
            module = importlib.import_module(module_name)
            _function(module, "add_arguments", name)(p)
            p.set_defaults(_run=_function(module, "command", name), _errors=getattr(module, "ERRORS", ()),
                           _parser=p)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command])
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # said by the command's parser, which names the command's --help
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        with command_threads(args):
            return args._run(args) or 0
    except UsageError as e:
        args._parser.error(str(e))   # one line, exit 2
    except args._errors as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
