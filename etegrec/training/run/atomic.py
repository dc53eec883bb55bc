"""Atomic writes: a file is replaced whole or not at all, never left torn by a kill."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["DiskFullError", "atomic_write_bytes", "atomic_write_text", "umask"]


class DiskFullError(RuntimeError):
    """The device filled up during an atomic write; the file it was replacing is untouched."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: never a torn file.

    The file gets the mode the umask gives a new file (0644 under umask 022), as ``open()`` would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; the file gets the mode a plain open() gives
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(f"no space left on the device to write {str(path)!r} (the file as it was before is "
                                "intact); free some space") from None
        raise


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
