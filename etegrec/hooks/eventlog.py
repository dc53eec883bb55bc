"""The local event log: every signal as one JSON line in ``<run_dir>/events.jsonl``."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from etegrec import signals

from .base import Subscriber

__all__ = ["EventLog", "read_events", "set_aside", "to_jsonable"]

MAX_LIST_ELEMENTS = 100_000  # larger arrays are summarised instead of written out
_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps(separators=...) builds one per call
KEPT_ON_RESUME = ("run_started", "run_finished")  # every attempt stays in the log

log = logging.getLogger(__name__)


def to_jsonable(value: Any) -> Any:
    """Convert numpy/torch values, paths and non-finite floats into plain JSON values."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.size > MAX_LIST_ELEMENTS:
            return {"shape": list(value.shape), "dtype": str(value.dtype),
                    "min": to_jsonable(value.min()), "max": to_jsonable(value.max())}
        if value.dtype.kind in "iub" or (value.dtype.kind == "f" and np.isfinite(value).all()):
            return value.tolist()  # already plain ints/floats/bools: no per-element pass
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": keeps the line valid JSON and the problem visible
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


class EventLog(Subscriber):
    """Appends one object per signal: ``signal``, ``time``, ``rank``, then the payload.

    Written by the main rank only and flushed per line, so a crash loses at most the line being
    written (and :func:`read_events` skips such a torn last line).
    """

    main_process_only = True

    def __init__(self, path: str | Path, *, rank: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.rank = rank
        self._file = None

    def handlers(self):
        def bind(name):
            return lambda sender, **payload: self.write(name, payload)
        return [(sig, bind(sig.name)) for sig in signals.ALL_SIGNALS]

    def start(self) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, name: str, payload: dict[str, Any]) -> None:
        if self._file is None:
            self.start()
        record = {"signal": name, "time": time.time(), "rank": self.rank, **to_jsonable(payload)}
        self._file.write(_ENCODER.encode(record) + "\n")
        self._file.flush()

    def cut_back(self, checkpoint: str, epoch: int) -> None:
        """Before a resumed run writes: drop the records after the ``checkpoint_saved`` record of the
        checkpoint file named ``checkpoint`` at ``epoch`` (their work is done again), and every line that
        is not a whole JSON record (one torn by a kill, a damaged one), so that new records start on a
        line of their own and the log reads back.

        What is cut goes to ``events.superseded.jsonl`` beside the log, not lost (an unreadable line as
        ``{"signal": null, "unreadable_line": n, "text": ...}``), and one warning line says so;
        ``run_started`` and ``run_finished`` records stay, so the log still shows every attempt.
        """
        if not self.path.exists():
            return
        events, unreadable = _read_lines(self.path)
        cut = next((i for i in range(len(events) - 1, -1, -1)
                    if events[i].get("signal") == "checkpoint_saved" and events[i].get("is_best") is False
                    and Path(events[i].get("path", "")).name == checkpoint and events[i].get("epoch") == epoch), None)
        if cut is None:  # killed while writing that very record: everything whole before it stays
            cut = len(events) - 1
        later = events[cut + 1:]
        kept = events[:cut + 1] + [e for e in later if e.get("signal") in KEPT_ON_RESUME]
        dropped = [e for e in later if e.get("signal") not in KEPT_ON_RESUME] + unreadable
        if not dropped:
            return
        superseded = _supersede(self.path, dropped)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".events.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:  # through a temporary file: never a torn log
            f.writelines(_ENCODER.encode(e) + "\n" for e in kept)
        os.chmod(tmp, self.path.stat().st_mode & 0o777)
        os.replace(tmp, self.path)
        records = len(dropped) - len(unreadable)
        moved = [f"{records} record(s) after the resumed checkpoint"] if records else []
        if unreadable:
            numbers = ", ".join(str(u["unreadable_line"]) for u in unreadable[:3])
            moved.append(f"{len(unreadable)} unreadable line(s) (line {numbers}{', ...' if len(unreadable) > 3 else ''})")
        log.warning("%s: moved %s to %s", self.path, " and ".join(moved), superseded.name)

    def finish(self, status: str = "completed") -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _supersede(path: Path, records: list[dict[str, Any]]) -> Path:
    """Append ``records`` to ``events.superseded.jsonl`` beside the log ``path``; returns that file."""
    superseded = path.with_name("events.superseded.jsonl")
    with open(superseded, "a", encoding="utf-8") as f:
        f.writelines(_ENCODER.encode(e) + "\n" for e in records)
    return superseded


def set_aside(path: str | Path) -> Path:
    """Move the whole event log ``path`` into ``events.superseded.jsonl`` (a new run starts afresh
    where an earlier one left records but nothing to resume); returns that file."""
    path = Path(path)
    events, unreadable = _read_lines(path)
    superseded = _supersede(path, events + unreadable)
    path.unlink()
    return superseded


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every whole record of an event log, and every other non-empty line as
    ``{"signal": None, "unreadable_line": n, "text": line}`` (a torn last line, a damaged one)."""
    events, unreadable = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            events.append(record)
        else:
            unreadable.append({"signal": None, "unreadable_line": lineno, "text": line})
    return events, unreadable


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Read an event log back; a torn (unterminated, unparsable) last line from a kill is skipped.

    Raises:
        ValueError: a malformed line anywhere but at the end, naming the file and line.
    """
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    events = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # the last line has no newline: torn by a kill
                break
            raise ValueError(f"{path}: line {lineno} is not valid JSON") from None
    return events
