"""``python -m etegrec.training.embed``: the stage's command (see :mod:`etegrec.training.embed`)."""
from __future__ import annotations

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
