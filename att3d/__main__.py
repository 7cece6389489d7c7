"""``python -m att3d``: the ``att3d`` command."""

import sys

from att3d.cli import main

if __name__ == "__main__":
    sys.exit(main())
