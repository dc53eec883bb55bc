"""``python -m etegrec.recommend RUN_DIR``: top-k items of a trained joint run for item histories.

    python -m etegrec.recommend RUN_DIR --history 50,172,133             # one history, oldest first
    python -m etegrec.recommend RUN_DIR --input histories.jsonl --output recs.jsonl

An input line is a JSON list of raw item ids or an object with a ``history`` list; an output line
is ``{"history": [...], "items": [...], "scores": [...]}``, in input order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

__all__ = ["main"]

BATCH = 256  # histories per beam-search call


def _read_histories(path: Path) -> list[list[str]]:
    if not path.exists():
        raise ValueError(f"--input {str(path)!r} does not exist")
    histories = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        value = value.get("history") if isinstance(value, dict) else value
        if not isinstance(value, list):
            raise ValueError(f"{path}: line {number}: expected a list of item ids or {{\"history\": [...]}}")
        histories.append([str(v) for v in value])
    return histories


def _history(text: str) -> list[str]:
    """``--history``'s value: comma-separated raw item ids, none of them empty."""
    ids = text.split(",")
    if not all(ids):
        raise ValueError(f"--history {text!r} holds an empty item id; give comma-separated raw item ids, oldest first "
                         "(--input a JSONL file for ids with commas)")
    return ids


def _check_output(path: Path | None) -> None:
    """Before any model is loaded: ``--output`` must go into a directory that exists."""
    if path is not None and not path.parent.is_dir():
        raise ValueError(f"--output {str(path)!r}: the directory {str(path.parent)!r} does not exist; create it or "
                         "write elsewhere")


def _check_device(name: str) -> None:
    """Before any model is loaded: ``--device`` must name a torch device this machine has."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: this machine has no CUDA device PyTorch can use; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported; use one of them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etegrec.recommend", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished joint run's directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", help="comma-separated raw item ids, oldest first")
    source.add_argument("--input", type=Path, help="JSONL of histories")
    parser.add_argument("--output", type=Path, help="JSONL to write (default: standard output)")
    parser.add_argument("-k", "--k", type=int, default=10, help="items per history (default 10)")
    parser.add_argument("--skip-unknown", action="store_true",
                        help="leave unknown item ids out, with a warning; a history with no known item gets no items")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    from etegrec.config import ConfigError
    from etegrec.training.trained import load_run

    try:
        _check_output(args.output)
        _check_device(args.device)
        histories = [_history(args.history)] if args.history is not None else _read_histories(args.input)
        run = load_run(args.run_dir, device=args.device)
        batches = range(0, len(histories), BATCH)
        if len(histories) > BATCH and sys.stderr.isatty():  # a bar on a terminal only, as the trainers
            batches = tqdm(batches, desc="recommend", unit="batch", file=sys.stderr)
        results = []
        for lo in batches:
            results += run.recommend(histories[lo:lo + BATCH], k=args.k, skip_unknown=args.skip_unknown)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = [json.dumps({"history": h, "items": [i for i, _ in r], "scores": [round(s, 6) for _, s in r]})
             for h, r in zip(histories, results)]
    if args.output:
        args.output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
