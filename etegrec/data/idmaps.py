"""Id maps that come beside the sequence formats: the ids in the file -> raw reviewer ids and ASINs.

P5's ``datamaps.json`` (beside S3-Rec/P5 text) is a JSON object with ``id2user`` / ``id2item``
(and their inverses ``user2id`` / ``item2id``); LC-Rec's ``<Name>.item2id`` and ``<Name>.user2id``
(beside ``<Name>.inter.json``) hold one ``token<TAB>id`` per line. A map lacking an id the
sequence file uses is an error: numbering that silently mixes raw tokens and bare ids would pass
ids off as ASINs.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

__all__ = ["IdMap", "lcrec_maps", "map_files", "p5_datamaps"]


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


def _p5_file(source: Path) -> Path:
    return source.parent / "datamaps.json"


def _lcrec_files(inter_json: Path) -> dict[str, Path]:
    stem = inter_json.name.removesuffix(".json").removesuffix(".inter")
    return {kind: inter_json.with_name(f"{stem}.{kind}2id") for kind in ("user", "item")}


def p5_datamaps(source: Path) -> tuple[IdMap | None, IdMap | None]:
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


def lcrec_maps(inter_json: Path) -> tuple[IdMap | None, IdMap | None]:
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
