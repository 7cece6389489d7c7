"""``python -m att3d.cli``: the ``att3d`` command (as ``python -m att3d``; ``torchrun ... -m att3d.cli train``)."""

import sys

from att3d.cli import main

if __name__ == "__main__":
    sys.exit(main())
