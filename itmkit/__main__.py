"""``python -m itmkit COMMAND``: the same as the ``itmkit`` command."""

import sys

from itmkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
