"""``item_codes.tsv``, a run's item codes by raw item id: written and read here only.

A header line ``item_id c0 .. c{L-1} suffix``, then one row per item (row i is item i + 1), fields
separated by tabs. An id is written as Python's ``csv`` module writes a field (minimal quoting): one
that holds a tab, a line break or a double quote is enclosed in double quotes, its own double quotes
doubled, so every id the data can spell round-trips; any other id is written as it is, which is
what files written before this rule hold (they read the same, unless an id starts with a quote).
"""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from etegrec.config import ConfigError

__all__ = ["codes_for_items", "format_item_codes", "read_item_codes"]

_DIALECT = {"delimiter": "\t", "quotechar": '"', "quoting": csv.QUOTE_MINIMAL, "lineterminator": "\n"}


def format_item_codes(codes: np.ndarray, item_ids: Sequence[str]) -> str:
    """The text of ``item_codes.tsv`` for ``codes`` ``[n_items, L + 1]`` and the raw ids of items 1..n."""
    codes = np.asarray(codes)
    if codes.shape[0] != len(item_ids):
        raise AssertionError(f"{codes.shape[0]} code rows for {len(item_ids)} items")
    out = io.StringIO()
    writer = csv.writer(out, **_DIALECT)
    writer.writerow(["item_id", *(f"c{i}" for i in range(codes.shape[1] - 1)), "suffix"])
    writer.writerows([str(item), *row] for item, row in zip(item_ids, codes.tolist()))
    return out.getvalue()


def read_item_codes(path: str | Path, *, missing: str = "load_run needs a finished joint run's directory"
                    ) -> tuple[tuple[str, ...], np.ndarray]:
    """``item_codes.tsv`` as (raw item ids, codes [n_items, L + 1]); row i is item i + 1.

    Raises:
        ConfigError: a missing file (the message ends with ``missing``) or a malformed line, named with its number.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist: {missing}")
    ids, rows = [], []
    with path.open(encoding="utf-8", newline="") as f:  # newline="": line breaks inside quoted ids stay in them
        reader = csv.reader(f, strict=True, **_DIALECT)
        try:
            next(reader, None)  # the header
            for fields in filter(None, reader):  # a blank line is no row
                try:
                    rows.append([int(v) for v in fields[1:]])
                except ValueError:
                    raise ConfigError(f"{str(path)}: line {reader.line_num}: expected an item id and integer codes, "
                                      f"got {fields!r}") from None
                ids.append(fields[0])
        except csv.Error as exc:
            raise ConfigError(f"{str(path)}: line {reader.line_num}: malformed ({exc}); the file is not one "
                              "etegrec wrote, or it was edited") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ConfigError(f"{str(path)}: expected one row of codes per item, all of one length")
    return tuple(ids), np.array(rows, dtype=np.int64)


def codes_for_items(path: str | Path, item_ids: Sequence[str], *, code_num: int, width: int) -> np.ndarray:
    """The codes [n_items, width] a file in ``item_codes.tsv``'s format gives the items ``item_ids`` (the raw ids of
    items 1..n, in that order), whatever the file's row order (``codes.file``).

    Raises:
        ConfigError: the file is missing or malformed, names an item twice, lacks an item of ``item_ids`` or holds
            one they lack, has another number of codes per item than ``width``, a code outside ``[0, code_num)``, or
            two items with the same codes (the beam search could not tell them apart); the message names the file.
    """
    ids, table = read_item_codes(path, missing="config key 'codes.file' names no file")
    where = f"{str(path)} (codes.file)"
    row_of: dict[str, int] = {}
    for row, item in enumerate(ids):
        if row_of.setdefault(item, row) != row:
            raise ConfigError(f"{where}: item {item!r} has two rows (lines {row_of[item] + 2} and {row + 2})")
    missing = [item for item in item_ids if item not in row_of]
    extra = sorted(set(row_of) - set(item_ids))
    if missing or extra:
        raise ConfigError(f"{where}: {len(missing)} of the dataset's {len(item_ids)} items have no codes there "
                          f"{missing[:3]!r}, and it holds {len(extra)} items the dataset lacks {extra[:3]!r}; "
                          "use the codes of a run on the same data")
    if table.shape[1] != width:
        raise ConfigError(f"{where}: {table.shape[1]} codes per item, the recommender reads {width} (tokenizer.num_layers "
                          "codes and a suffix)")
    codes = table[[row_of[item] for item in item_ids]]
    bad = np.flatnonzero(((codes < 0) | (codes >= code_num)).any(axis=1))
    if len(bad):
        raise ConfigError(f"{where}: item {item_ids[bad[0]]!r} has codes {codes[bad[0]].tolist()!r}, outside "
                          f"[0, {code_num}) (tokenizer.codebook_size)")
    _, first, counts = np.unique(codes, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        shared = codes[first[np.argmax(counts > 1)]]
        clash = [item_ids[i] for i in np.flatnonzero((codes == shared).all(axis=1))[:3]]
        raise ConfigError(f"{where}: items {clash!r} share the codes {shared.tolist()!r}; every item needs codes of "
                          "its own (give them different suffixes)")
    return codes
