"""How often does a training batch hold the same target item twice? What in-batch InfoNCE sees.

    python benchmarks/batch_targets.py [--config ml-100k] [--seed 2024] [--out benchmarks/results/batch_targets.json]

The preference-semantic alignment of the paper (``losses.cl_negatives=batch``) contrasts every target
of a batch with the batch's other targets, so a copy of the target's own item counts as a negative.
This reports, over the first epoch's batches of the joint stage (the windows, ``joint.batch_size``
and the shuffling of the config, ``targets: all``), the scored targets per batch, the share of
targets whose item occurs again in the batch, and the mean number of copies of a target's item.
Data only, no model; seconds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from etegrec.config import load_config
from etegrec.models import window_targets
from etegrec.data import make_windows
from etegrec.training.run.loop import shuffled_batches
from etegrec.training.run.cache import load_stage_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml-100k")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--out", default="benchmarks/results/batch_targets.json")
    args = parser.parse_args(argv)
    config = load_config(args.config, [f"run.seed={args.seed}"])
    if config.joint.targets != "all":
        parser.error(f"config {args.config!r} trains one target per history (joint.targets={config.joint.targets}); "
                     "this counts the targets of windows")
    data = load_stage_data(config)
    length = data.max_his_len
    windows, counted = make_windows(data.train_sequences(None), length + 1, config.joint.window_stride or length)
    windows, counted = torch.as_tensor(windows), torch.as_tensor(counted)
    sizes, repeated, copies = [], 0, 0.0
    for batch in shuffled_batches(len(windows), config.joint.batch_size, seed=args.seed, epoch=0):
        _, targets, scored = window_targets(windows[batch], counted[batch])
        _, inverse, count = torch.unique(targets[scored], return_inverse=True, return_counts=True)
        per_target = count[inverse]  # copies of each target's item in its batch, itself included
        sizes.append(len(per_target))
        repeated += int((per_target > 1).sum())
        copies += float(per_target.sum())
    total = sum(sizes)
    result = {"config": args.config, "seed": args.seed, "batch_size": config.joint.batch_size, "batches": len(sizes),
              "targets_per_batch": total / len(sizes), "share_repeated_in_batch": repeated / total,
              "mean_copies_of_own_item": copies / total}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
