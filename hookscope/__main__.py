"""``python -m hookscope``: the command line (see :mod:`hookscope.cli`)."""

import sys

from hookscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
