"""Data: readers, k-core filtering, leave-one-out splits and the prepared-data cache.

``load_dataset("ml-100k")`` (or a name in :data:`DATASETS`, e.g. ``amazon-beauty``) gives a
:class:`SequenceData`; ``python -m etegrec.data`` prepares a
dataset and prints its statistics. This package imports nothing else of etegrec.
"""
from __future__ import annotations

from .attributes import attributes_path, load_item_attributes, read_item_attributes
from .prepare import SequenceData, k_core, pad_histories, prepare_interactions, prepare_splits
from .readers import FORMATS, DataError, Interactions, PreparedSplits, detect_format, read_interactions, read_prepared
from .registry import DATASETS, NamedDataset, file_sha256
from .sources import data_home, dataset_name_of, load_dataset
from .windows import make_windows

__all__ = [
    "DATASETS",
    "FORMATS",
    "DataError",
    "Interactions",
    "NamedDataset",
    "PreparedSplits",
    "SequenceData",
    "attributes_path",
    "data_home",
    "dataset_name_of",
    "detect_format",
    "file_sha256",
    "k_core",
    "load_dataset",
    "load_item_attributes",
    "make_windows",
    "pad_histories",
    "prepare_interactions",
    "prepare_splits",
    "read_interactions",
    "read_item_attributes",
    "read_prepared",
]
