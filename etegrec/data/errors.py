"""The one error type of etegrec.data, in a module of its own so every data module can raise it."""
from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing input data; the message names the file and what was wrong."""
