"""The sequence formats the field passes around, and the id maps that come beside them.

S3-Rec/P5 text (``user item1 item2 ...`` per line) and LC-Rec/LETTER ``.inter.json``
(``{"user": [items]}``) list each user's items in time order and carry no timestamps; their
parsers here give plain ``(users, items)`` rows, one per interaction in file order, and the readers
(:mod:`.readers`) make them :class:`Interactions` without timestamps.

P5's ``datamaps.json`` (beside S3-Rec/P5 text) is a JSON object with ``id2user`` / ``id2item``
(and their inverses ``user2id`` / ``item2id``); LC-Rec's ``<Name>.item2id`` and ``<Name>.user2id``
(beside ``<Name>.inter.json``) hold one ``token<TAB>id`` per line. A map lacking an id the
sequence file uses is an error: numbering that silently mixes raw tokens and bare ids would pass
ids off as ASINs.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["IdMap", "item_id_map", "lcrec_rows", "map_files", "s3rec_rows"]


@dataclass(frozen=True)
class IdMap:
    """One id map: the file it came from, what it maps (``user`` or ``item``) and id -> token."""

    file: Path
    kind: str
    tokens: dict[str, str]

    def token(self, id_: str, path: Path, where: Callable[[], str]) -> str:
        """The raw token of ``id_`` as ``path`` uses it; ``where()`` says where (``line 3``), on errors only."""
        try:
            return self.tokens[id_]
        except KeyError:
            raise DataError(f"{path}: {where()}: {self.kind} id {id_!r} is not in the id map {self.file}; "
                            f"use the map that belongs to this file, or move {self.file.name} away "
                            "to keep the numeric ids") from None


def map_files(source: Path, fmt: str) -> list[Path]:
    """The id map files present beside ``source`` that the reader of ``fmt`` reads (part of its content)."""
    files = []
    if fmt == "s3rec":
        files = [_p5_file(source)]
    elif fmt == "lcrec":
        files = list(_lcrec_files(source).values())
    return [file for file in files if file.exists()]


def item_id_map(source: Path, fmt: str) -> IdMap | None:
    """The item id map the reader of ``fmt`` applies to ``source``'s items; None when it applies none."""
    if fmt == "s3rec":
        return _p5_datamaps(source)[1]
    if fmt == "lcrec":
        return _lcrec_maps(source)[1]
    return None


def _p5_file(source: Path) -> Path:
    return source.parent / "datamaps.json"


def _lcrec_files(inter_json: Path) -> dict[str, Path]:
    stem = inter_json.name.removesuffix(".json").removesuffix(".inter")
    return {kind: inter_json.with_name(f"{stem}.{kind}2id") for kind in ("user", "item")}


def _p5_datamaps(source: Path) -> tuple[IdMap | None, IdMap | None]:
    """``(users, items)`` of P5's ``datamaps.json`` beside ``source``; ``(None, None)`` when absent."""
    file = _p5_file(source)
    if not file.exists():
        return None, None
    try:
        maps = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: not a JSON id map ({exc}); expected P5's datamaps.json "
                        "(id2user, id2item)") from None
    if not isinstance(maps, dict) or not ({"id2item", "item2id"} & maps.keys()):
        found = sorted(maps) if isinstance(maps, dict) else type(maps).__name__
        raise DataError(f"{file}: expected P5's datamaps.json, a JSON object with id2item or item2id; found {found}")
    return _from_json(file, maps, "user"), _from_json(file, maps, "item")


def _from_json(file: Path, maps: dict, kind: str) -> IdMap | None:
    forward, inverse = maps.get(f"id2{kind}"), maps.get(f"{kind}2id")
    table = forward if forward is not None else inverse
    if table is None:
        return None
    if not isinstance(table, dict):
        raise DataError(f"{file}: id2{kind}/{kind}2id is a JSON {type(table).__name__}; expected an object")
    pairs = table.items() if forward is not None else ((v, k) for k, v in table.items())
    return IdMap(file, kind, {str(i).strip(): str(token) for i, token in pairs})


def _lcrec_maps(inter_json: Path) -> tuple[IdMap | None, IdMap | None]:
    """``(users, items)`` from ``<Name>.user2id`` / ``<Name>.item2id`` beside ``<Name>.inter.json``."""
    files = _lcrec_files(inter_json)
    return _read_id_lines(files["user"], "user"), _read_id_lines(files["item"], "item")


def _read_id_lines(file: Path, kind: str) -> IdMap | None:
    if not file.exists():
        return None
    tokens = {}
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != 2 or not fields[1].strip().isdigit():
                raise DataError(f"{file}: line {lineno}: expected '{kind} token<TAB>integer id', found {line.strip()[:60]!r}")
            tokens[fields[1].strip()] = fields[0]
    return IdMap(file, kind, tokens)


Rows = tuple[list[str], list[str]]  # (user of each interaction, item of each interaction)


def s3rec_rows(path: Path, lines: Iterable[str]) -> Rows:
    """S3-Rec/P5 text read from ``lines`` of ``path``: ``user item1 item2 ...``, integer ids.

    P5's ``datamaps.json`` beside the file, when present, turns the ids into reviewer ids and ASINs.
    """
    user_map, item_map = _p5_datamaps(path)
    users, items = [], []
    for lineno, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        bad = next((f for f in fields if not f.isdigit()), None)
        if len(fields) < 2 or bad is not None:
            found = f"{bad!r} is not an integer id" if bad is not None else "only a user id"
            raise DataError(f"{path}: line {lineno}: expected 'user item1 item2 ...' (integer ids separated "
                            f"by spaces), but {found}")
        _append_sequence(users, items, fields[0], fields[1:], user_map, item_map, path,
                         functools.partial(str, f"line {lineno}"))
    return users, items


def lcrec_rows(path: Path, file) -> Rows:
    """LC-Rec/LETTER ``.inter.json`` read from the text ``file`` of ``path``: ``{"user": [item, ...]}``.

    ``<Name>.user2id`` / ``<Name>.item2id`` beside the file, when present, give the raw tokens.
    """
    user_map, item_map = _lcrec_maps(path)
    text = file.read()
    try:
        sequences = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg})") from None
    if not isinstance(sequences, dict):
        raise DataError(f"{path}: a JSON {type(sequences).__name__}; expected an object "
                        '{"user id": [item ids in time order]} (LC-Rec .inter.json)')
    users, items = [], []
    for user, seq in sequences.items():
        where = functools.partial(_line_of_key, text, user)
        if not isinstance(seq, list) or not seq or not all(type(i) is int for i in seq):
            raise DataError(f"{path}: {where()}: expected a non-empty list of integer item ids, found "
                            f"{json.dumps(seq)[:60]}")
        _append_sequence(users, items, user, [str(i) for i in seq], user_map, item_map, path, where)
    return users, items


def _line_of_key(text: str, key: str) -> str:
    """Where ``key`` of a JSON object starts (only on errors: it scans the text), as ``line N (user 'key')``."""
    at = max(text.find(json.dumps(key) + ":"), 0)
    return f"line {text.count(chr(10), 0, at) + 1} (user {key!r})"


def _append_sequence(users: list, items: list, user: str, seq: list[str], user_map: IdMap | None,
                     item_map: IdMap | None, path: Path, where: Callable[[], str]) -> None:
    """Add one user's sequence as rows, with raw tokens from the id maps where there are maps."""
    if user_map is not None:
        user = user_map.token(user, path, where)
    if item_map is not None:
        seq = [item_map.token(i, path, where) for i in seq]
    users.extend([user] * len(seq))
    items.extend(seq)
