"""``python -m pipeline COMMAND``, the spelling before ``itmkit COMMAND``: says what to run
instead (one line, exit 2). It imports nothing from ``itmkit``, which sits above this package."""

import shlex
import sys

if __name__ == "__main__":
    print(f"python -m pipeline is no longer a command; run: itmkit {shlex.join(sys.argv[1:]) or 'COMMAND'}",
          file=sys.stderr)
    sys.exit(2)
