"""Item attributes (categories, brand, ...) beside a dataset: a side input the tokenizer may read.

The format is S3-Rec's ``<Name>_item2attributes.json``: a JSON object from each item's id, as the
interaction file writes it, to the list of its attribute ids (numbers or strings). Where the reader
maps the interaction file's item ids through an id map (P5's ``datamaps.json``, LC-Rec's
``.item2id``), the attribute file's keys go through the same map, so ``"4"`` in S3-Rec's Beauty
file is the item that ``Beauty.txt`` calls 4; without a map the keys are the item tokens themselves.
Entries for items the prepared data lacks (dropped by the k-core filter) are ignored; an item with
no entry has no attributes.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError
from .readers import detect_format
from .registry import fetch_attributes
from .sequences import IdMap, item_id_map
from .sources import data_home, resolve_source

__all__ = ["attributes_path", "load_item_attributes", "read_item_attributes"]


def attributes_path(value: str, dataset: str) -> Path:
    """The file ``tokenizer.attributes`` names: ``dataset`` is the named dataset's published attributes file
    (fetched and verified like its other files), anything else a path.

    Raises:
        DataError: no such file, or a named dataset that publishes none.
    """
    if value == "dataset":
        return fetch_attributes(dataset, data_home() / "raw" / dataset)
    path = Path(value)
    if not path.is_file():
        raise DataError(f"item attributes file {value!r} (tokenizer.attributes) does not exist")
    return path


def load_item_attributes(value: str, *, dataset: str, data_path: str | None, fmt: str | None,
                         items: Sequence[str]) -> list[list[str]]:
    """The attributes of items 1..n (``items``: their tokens, in order) from the file ``value`` names
    (:func:`attributes_path`), its keys read through the id map the dataset's reader uses."""
    path = attributes_path(value, dataset)
    source = resolve_source(dataset, data_path)
    return read_item_attributes(path, items, item_id_map(source, fmt or detect_format(source)))


def read_item_attributes(path: Path, items: Sequence[str], id_map: IdMap | None = None) -> list[list[str]]:
    """Each item's attributes (as strings, in the file's order), for the items whose tokens are ``items``.

    Raises:
        DataError: not a JSON object of lists, a key the id map lacks, or no item of ``items`` in the file;
            the message names the file (and the key).
    """
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not JSON ({exc}); expected an item attributes file, "
                        '{"item id": [attribute, ...], ...}') from None
    if not isinstance(table, dict):
        raise DataError(f"{path}: a JSON {type(table).__name__}; expected an object from item id to a list of "
                        "attributes")
    index = {token: i for i, token in enumerate(items)}
    out: list[list[str]] = [[] for _ in items]
    found = 0
    for key, values in table.items():
        if not isinstance(values, list) or not all(type(v) in (str, int) for v in values):
            raise DataError(f"{path}: item {key!r}: expected a list of attribute ids (numbers or strings), "
                            f"found {json.dumps(values)[:60]}")
        token = id_map.token(str(key).strip(), path, lambda: f"key {key!r}") if id_map is not None else str(key)
        row = index.get(token)
        if row is not None:
            out[row] = list(dict.fromkeys(str(v) for v in values))
            found += 1
    if not found:
        example = next(iter(table), None)
        raise DataError(f"{path}: none of its {len(table)} items is an item of the dataset (e.g. {example!r} against "
                        f"{items[0]!r}); its keys must be the item ids the interaction file uses")
    return out
