"""Readers for the interaction formats etegrec understands.

Every reader returns :class:`Interactions` in file order (the chronological sort happens later and
is stable, so file order breaks timestamp ties). ETEGRec-style prepared splits are already split
and are read by :func:`read_prepared` into a :class:`PreparedSplits`.

The sequence formats (``s3rec``, ``lcrec``; parsed in :mod:`.sequences` with their id maps) have no
timestamps: their file order is time order, and their readers give ``timestamps=None``.

Bad input raises :class:`DataError` with one sentence naming the file, the line and what was
expected; the command line prints it without a traceback.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError
from .sequences import lcrec_rows, s3rec_rows

__all__ = [
    "FORMATS",
    "DataError",
    "Interactions",
    "PreparedSplits",
    "detect_format",
    "prepared_prefix",
    "read_interactions",
    "read_prepared",
]

FORMATS = ("inter", "movielens", "movielens-dat", "movielens-csv", "amazon2023", "amazon2014", "s3rec", "lcrec",
           "prepared")


@dataclass(frozen=True)
class Interactions:
    """Raw interactions in file order: user and item tokens and a timestamp per row.

    ``timestamps`` is ``None`` for the formats without them (``s3rec``, ``lcrec``): there each
    user's rows are already in time order, and no time is invented that could pass for a real one.
    """

    users: np.ndarray  # (n,) str
    items: np.ndarray  # (n,) str
    timestamps: np.ndarray | None  # (n,) float64, or None: file order is time order


@dataclass(frozen=True)
class PreparedSplits:
    """ETEGRec-style prepared splits: one sample per line, item ids already numbered."""

    train: tuple[list[list[int]], list[int]]  # (histories, targets)
    valid: tuple[list[list[int]], list[int]]
    test: tuple[list[list[int]], list[int]]
    item_map: dict[str, int] | None  # raw item token -> id used in the files


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def prepared_prefix(path: Path) -> Path | None:
    """``dir/name.train.jsonl`` or a directory holding one -> ``dir/name``."""
    if path.is_dir():
        found = sorted(path.glob("*.train.jsonl"))
        return Path(str(found[0])[: -len(".train.jsonl")]) if found else None
    if path.name.endswith(".train.jsonl"):
        return Path(str(path)[: -len(".train.jsonl")])
    return None


def detect_format(path: Path) -> str:
    """Recognise the format of ``path`` from its name and first line (see :data:`FORMATS`)."""
    if prepared_prefix(path) is not None:
        return "prepared"
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a directory without a '<name>.train.jsonl' prepared split; "
                        "pass the interaction file itself with --data-path")
    if path.suffix == ".inter":
        return "inter"
    if path.name.endswith(".inter.json"):
        return "lcrec"
    try:
        with _open_text(path) as f:
            first = f.readline().strip()
    except (UnicodeDecodeError, EOFError, OSError) as exc:
        raise _unreadable(path, exc) from None
    if first == "{":  # a pretty-printed JSON object; JSON lines put a whole record on each line
        return "lcrec"
    if first.startswith("{"):
        return _detect_json_record(path, first)
    if "::" in first:
        return "movielens-dat"
    if first.split(",")[:2] == ["userId", "movieId"]:
        return "movielens-csv"
    fields = first.split("\t")
    if any(":" in f for f in fields):
        return "inter"
    fields = first.split()
    # u.data is tab-separated with a 9- or 10-digit unix time last; an S3-Rec line is space-separated ids
    if len(fields) == 4 and ("\t" in first or len(fields[3]) >= 9):
        return "movielens"
    if len(fields) >= 2 and all(f.isdigit() for f in fields):
        return "s3rec"
    raise DataError(f"{path}: cannot tell its format from line 1 ({first[:60]!r}); "
                    f"pass --format (or --set data.format=) with one of {', '.join(FORMATS)}")


def _detect_json_record(path: Path, first: str) -> str:
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line 1 is not valid JSON ({exc.msg})") from None
    keys = record.keys()
    if "parent_asin" in keys:
        return "amazon2023"
    if "reviewerID" in keys or "asin" in keys:
        return "amazon2014"
    if record and all(isinstance(v, list) for v in record.values()):  # a one-line {"user": [items]}
        return "lcrec"
    raise DataError(f"{path}: line 1 has keys {sorted(keys)}; expected Amazon 2023 reviews "
                    "(user_id, parent_asin, timestamp) or 2014/2018 ones (reviewerID, asin, unixReviewTime)")


def _unreadable(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); expected UTF-8 text, "
                     "gzip-compressed when the name ends in .gz")


def _read_with_header(path: Path, sep: str, user: str, item: str, time: str) -> Interactions:
    """A delimited file whose header names its columns (RecBole ``name:type``, MovieLens ``name``)."""
    users, items, times = [], [], []
    with _open_text(path) as f:
        header = f.readline().rstrip("\r\n").split(sep)
        names = [h.split(":", 1)[0] for h in header]
        columns = []
        for want in (user, item, time):
            if want not in names:
                raise DataError(f"{path}: no {want!r} column in the header; found {names}")
            columns.append(names.index(want))
        ui, ii, ti = columns
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split(sep)
            if len(fields) != len(names):
                raise DataError(f"{path}: line {lineno}: expected {len(names)} {_SEPARATOR_NAMES[sep]}-separated "
                                f"fields ({', '.join(header)}), found {len(fields)}")
            users.append(fields[ui])
            items.append(fields[ii])
            times.append(_timestamp(fields[ti], path, lineno))
    return _as_arrays(users, items, times)


_SEPARATOR_NAMES = {"\t": "tab", ",": "comma", "::": "'::'", None: "whitespace"}


def _read_headerless(path: Path, sep: str | None) -> Interactions:
    """MovieLens without a header: ``user item rating timestamp`` (u.data: whitespace; ml-1m: ``::``)."""
    users, items, times = [], [], []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.strip().split(sep)
            if len(fields) != 4:
                raise DataError(f"{path}: line {lineno}: expected 4 {_SEPARATOR_NAMES[sep]}-separated fields "
                                f"(user item rating timestamp), found {len(fields)}")
            users.append(fields[0])
            items.append(fields[1])
            times.append(_timestamp(fields[3], path, lineno))
    return _as_arrays(users, items, times)


def _timestamp(value, path: Path, lineno: int, name: str = "timestamp") -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}: line {lineno}: {name} {value!r} is not a number") from None


def _json_lines(path: Path):
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(record).__name__}, expected an object")
            yield lineno, record


def _read_json_reviews(path: Path, user_key: str, item_key: str, time_key: str) -> Interactions:
    users, items, times = [], [], []
    for lineno, record in _json_lines(path):
        missing = [k for k in (user_key, item_key, time_key) if k not in record]
        if missing:
            raise DataError(f"{path}: line {lineno} has no {missing[0]!r} field; found {sorted(record)}")
        times.append(_timestamp(record[time_key], path, lineno, time_key))
        users.append(str(record[user_key]))
        items.append(str(record[item_key]))
    return _as_arrays(users, items, times)


def _read_sequences(path: Path, rows) -> Interactions:
    """A sequence format (see :mod:`.sequences`): ``rows(path, file)`` gives its users and items."""
    with _open_text(path) as f:  # text mode reads P5's CRLF copies as well
        users, items = rows(path, f)
    return _as_arrays(users, items, None)


def _as_arrays(users, items, times) -> Interactions:
    return Interactions(np.asarray(users, dtype=str), np.asarray(items, dtype=str),
                        None if times is None else np.asarray(times, dtype=np.float64))


_READERS = {
    "inter": lambda p: _read_with_header(p, "\t", "user_id", "item_id", "timestamp"),
    "movielens": lambda p: _read_headerless(p, None),
    "movielens-dat": lambda p: _read_headerless(p, "::"),
    "movielens-csv": lambda p: _read_with_header(p, ",", "userId", "movieId", "timestamp"),
    "amazon2023": lambda p: _read_json_reviews(p, "user_id", "parent_asin", "timestamp"),
    "amazon2014": lambda p: _read_json_reviews(p, "reviewerID", "asin", "unixReviewTime"),
    "s3rec": lambda p: _read_sequences(p, s3rec_rows),
    "lcrec": lambda p: _read_sequences(p, lcrec_rows),
}


def read_interactions(path: str | Path, fmt: str | None = None) -> Interactions:
    """Read an interaction file in file order; ``fmt`` forces a format, else it is detected.

    Amazon 2023 timestamps are milliseconds and 2014/2018 ones seconds; only their order matters.
    ``s3rec`` and ``lcrec`` give no timestamps (``None``): their file order is time order.

    Raises:
        DataError: missing file, unknown format, malformed line, missing column, or an id the
            id map beside the file lacks.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check --data-path")
    fmt = fmt or detect_format(path)
    if fmt == "prepared":
        raise DataError(f"{path} holds prepared splits; read it with read_prepared")
    if fmt not in _READERS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    try:
        return _READERS[fmt](path)
    except (UnicodeDecodeError, EOFError, OSError) as exc:  # gzip.BadGzipFile is an OSError
        raise _unreadable(path, exc) from None


def _read_split(path: Path) -> tuple[list[list[int]], list[int]]:
    histories, targets = [], []
    for lineno, record in _json_lines(path):
        hist, target = record.get("inter_history"), record.get("target_id")
        if hist is None or target is None:
            key = "inter_history" if hist is None else "target_id"
            raise DataError(f"{path}: line {lineno} has no {key!r} field; found {sorted(record)}")
        if not isinstance(hist, list) or not all(isinstance(i, int) for i in hist) or not isinstance(target, int):
            raise DataError(f"{path}: line {lineno}: inter_history must be a list of integers "
                            "and target_id an integer")
        histories.append(hist)
        targets.append(target)
    return histories, targets


def read_prepared(path: str | Path) -> PreparedSplits:
    """Read ``<name>.train/valid/test.jsonl`` (and ``<name>.emb_map.json`` or ``<name>.item2id.json``)."""
    path = Path(path)
    prefix = prepared_prefix(path)
    if prefix is None:
        raise DataError(f"{str(path)!r} is not a prepared split ('<name>.train.jsonl' or a directory holding one)")
    splits = {}
    for split in ("train", "valid", "test"):
        file = Path(f"{prefix}.{split}.jsonl")
        if not file.exists():
            raise DataError(f"prepared split {str(file)!r} is missing (needed beside {prefix.name}.train.jsonl)")
        splits[split] = _read_split(file)
    item_map = None
    for suffix in (".emb_map.json", ".item2id.json"):
        file = Path(f"{prefix}{suffix}")
        if file.exists():
            try:
                item_map = {str(k): int(v) for k, v in json.loads(file.read_text()).items()}
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                raise DataError(f"{file}: expected a JSON object mapping item tokens to integer ids") from None
            break
    return PreparedSplits(item_map=item_map, **splits)
