"""``python -m features extract``: the same as ``itmkit extract`` (the earlier spelling, kept for
scripts)."""

import sys

from itmkit.cli import build_parser, main  # noqa: F401  (build_parser: for tests and scripts)

if __name__ == "__main__":
    sys.exit(main())
