"""``python -m etegrec.training.joint``: the stage's command (see :mod:`etegrec.training.joint`)."""
from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
