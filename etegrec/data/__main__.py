"""``python -m etegrec.data [DATASET] [--data-path PATH]``: prepare a dataset and print its statistics."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import FORMATS, DataError, dataset_name_of, load_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etegrec.data", description=__doc__)
    parser.add_argument("dataset", nargs="?", default=None,
                        help="dataset name: ml-100k (default), amazon-beauty, amazon-sports, amazon-instruments "
                             "(fetched on first use), or the file name of --data-path")
    parser.add_argument("--data-path", help="interaction file or prepared split to read instead of the named dataset")
    parser.add_argument("--format", choices=FORMATS, help="force the reader (detected from the file otherwise)")
    parser.add_argument("--min-count", type=int, default=5, help="k of the iterative k-core filter (default 5)")
    parser.add_argument("--max-his-len", type=int, default=20, help="history length kept (default 20)")
    parser.add_argument("--no-cache", action="store_true", help="prepare again and do not write the cache")
    args = parser.parse_args(argv)
    name = args.dataset or (args.data_path and dataset_name_of(args.data_path)) or "ml-100k"
    start = time.perf_counter()
    try:
        data = load_dataset(name, data_path=args.data_path, fmt=args.format, min_count=args.min_count,
                            max_his_len=args.max_his_len, use_cache=not args.no_cache)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = data.stats()
    print(f"dataset       {name}")
    print(f"users         {stats['users']}")
    print(f"items         {stats['items']}")
    print(f"interactions  {stats['interactions']}")
    print(f"avg length    {stats['avg_length']}")
    print(f"train samples {stats['train_samples']}")
    print(f"valid samples {stats['valid_samples']}")
    print(f"test samples  {stats['test_samples']}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
