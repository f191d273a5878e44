"""``python -m pipeline COMMAND``: the same as ``itmkit COMMAND`` (the earlier spelling, kept for
scripts)."""

import sys

from itmkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
