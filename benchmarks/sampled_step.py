"""The SASRec stage's training step with the full and the sampled softmax, on a real dataset.

Run: ``python benchmarks/sampled_step.py [--dataset amazon-beauty] [--steps 20]``; writes
``benchmarks/results/sampled_step.json``. The model, windows and batch size are those of the
dataset's config (``amazon`` for the Amazon sets, ``ml-100k`` otherwise); the two losses take
turns step by step on the same batches, so load from other processes hits both alike. One thread.
``benchmarks/scale.py`` shows how the two grow with the catalogue; this is the figure on one
real catalogue (Beauty: 12,101 items).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from etegrec.config import load_config
from etegrec.models import SASRec
from etegrec.data.windows import make_windows
from etegrec.training.run.cache import load_stage_data

RESULT = Path(__file__).resolve().parent / "results" / "sampled_step.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config("amazon" if args.dataset.startswith("amazon-") else "ml-100k", [f"data.dataset={args.dataset}"])
    cfg, data = config.embed, load_stage_data(config)
    windows, counted = make_windows(data.train_sequences(), data.max_his_len + 1, cfg.window_stride)
    order = np.random.default_rng(0).permutation(len(windows))
    seconds: dict[str, list[float]] = {"full": [], "sampled": []}
    models = {}
    for loss in seconds:
        torch.manual_seed(0)
        model = SASRec(n_items=data.n_items, hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       dropout=cfg.dropout, max_len=data.max_his_len, tied_output=cfg.tied_output,
                       repeat_bias=cfg.repeat_bias)
        models[loss] = model, torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    targets = 0
    for step in range(args.steps + 1):  # step 0 warms up (Adam's state, the allocator)
        index = torch.as_tensor(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
        batch, batch_counted = torch.as_tensor(windows)[index], torch.as_tensor(counted)[index]
        targets += int(batch_counted.sum()) if step else 0
        for loss, (model, optimizer) in models.items():
            started = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model.window_loss(batch, batch_counted, negatives=cfg.negatives if loss == "sampled" else None).backward()
            optimizer.step()
            if step:
                seconds[loss].append(time.perf_counter() - started)
    per_step = {loss: float(np.median(s)) for loss, s in seconds.items()}
    batches = -(-len(windows) // cfg.batch_size)
    print(f"{args.dataset}: {data.n_items} items, {len(windows)} windows, batch {cfg.batch_size}, "
          f"{cfg.negatives} negatives, {args.steps} steps each, 1 thread")
    for loss, s in per_step.items():
        print(f"{loss:>8}: {s * 1000:.0f} ms a step (median), about {s * batches:.0f} s an epoch of {batches} batches")
    print(f"speed-up: x{per_step['full'] / per_step['sampled']:.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "dataset": args.dataset, "items": data.n_items, "windows": len(windows), "batch_size": cfg.batch_size,
        "negatives": cfg.negatives, "hidden": cfg.hidden, "steps": args.steps, "targets": targets,
        "seconds": seconds, "median_step_s": per_step, "speedup": per_step["full"] / per_step["sampled"],
        "threads": 1, "load_average": list(os.getloadavg()),
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
