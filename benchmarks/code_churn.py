"""How fragile are the item codes? One tokenizer epoch, as the joint stage runs it, and the codes it moves.

    python benchmarks/code_churn.py [--config ml-100k] [--seed 2024] [--margins 0 0.02 0.05 0.1 0.2]
                                    [--lrs 1e-5 1e-4 1e-3] [--out benchmarks/results/code_churn.json]

From the pretrained tokenizer of the config's stage cache (trained there first when missing, as the
pipeline does), it reports:

- for every quantizer level, the share of items whose second-nearest code is within 5% / 20% of
  the nearest (squared distances): items that any small change of the tokenizer can flip;
- for every learning rate, one epoch of the tokenizer's RQ-VAE loss on the training targets (the
  batches of the joint stage: ``joint.batch_size`` windows' worth of targets, linear warm-up, AdamW
  with ``joint.weight_decay``), then the share of items whose code changed, for every sticky-code
  margin (``codes.margin``; 0 = the nearest codes, the paper).

One thread, seeded; about a minute on ml-100k.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from etegrec.config import load_config
from etegrec.forge import get_code
from etegrec.data import make_windows
from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
from etegrec.training.embed import EMBED
from etegrec.training.run.pipeline import ensure
from etegrec.training.rqvae import RQVAE
from etegrec.training.run.cache import load_stage_data

NEAR = (1.05, 1.2)  # "within 5% / 20% of the nearest"


def near_ties(tokenizer, items: torch.Tensor) -> list[dict[str, float]]:
    """Per level, the share of items whose second-nearest code is within each ratio of :data:`NEAR`."""
    with torch.no_grad():
        out = tokenizer.eval()(items)
    rows = []
    for logits in out.logits:
        two = (-logits).topk(2, dim=1, largest=False).values  # (n, 2) nearest, second nearest
        ratio = (two[:, 1] / two[:, 0].clamp_min(1e-12)).numpy()
        rows.append({f"within_{round((r - 1) * 100)}pct": float(np.mean(ratio < r)) for r in NEAR})
    return rows


def one_epoch(config, state, items: torch.Tensor, targets: np.ndarray, lr: float, steps: int, batch: int):
    """The pretrained tokenizer after one epoch of its RQ-VAE loss on ``steps`` batches of training targets."""
    tokenizer = build_tokenizer(config.tokenizer, items.shape[1])
    tokenizer.load_state_dict(state)
    tokenizer.train()
    opt = torch.optim.AdamW(tokenizer.parameters(), lr=lr, weight_decay=config.joint.weight_decay)
    rng = np.random.default_rng(config.run.seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (step + 1) / steps  # the joint stage's first epoch is its warm-up
        loss = tokenizer(items[rng.choice(targets, batch)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml-100k")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    parser.add_argument("--out", default="benchmarks/results/code_churn.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = load_config(args.config, [f"run.seed={args.seed}"])
    data = load_stage_data(config)
    accelerator = Accelerator(cpu=True)
    embeddings, state = (ensure(stage, config, data, accelerator) for stage in (EMBED, RQVAE))
    items = torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings))  # (n_items + 1, d), row 0 padding
    sequences = data.train_sequences()
    targets = np.concatenate([seq[1:] for seq in sequences])  # every training target
    length = data.max_his_len  # the joint stage's windows (joint.targets: all): targets per step, steps
    windows, _ = make_windows(sequences, length + 1, config.joint.window_stride or length)
    steps = -(-len(windows) // config.joint.batch_size)
    per_batch = round(len(targets) / steps)

    base_tokenizer = build_tokenizer(config.tokenizer, items.shape[1])
    base_tokenizer.load_state_dict(state)
    base = get_code(base_tokenizer, items, epoch=0, use_forge=config.codes.use_forge, policy=config.codes.forge_policy)
    result = {"config": args.config, "seed": args.seed, "items": int(items.shape[0] - 1),
              "steps": steps, "targets_per_step": per_batch, "near_ties": near_ties(base_tokenizer, items[1:]),
              "changed": {}}
    started = time.perf_counter()
    for lr in args.lrs:
        tokenizer = one_epoch(config, state, items, targets, lr, steps, per_batch)
        result["changed"][str(lr)] = {
            str(m): get_code(tokenizer, items, epoch=1, use_forge=config.codes.use_forge,
                             policy=config.codes.forge_policy, previous=base, margin=m).assignment.changed / result["items"]
            for m in args.margins}
    result["seconds"] = round(time.perf_counter() - started, 1)
    for level, row in enumerate(result["near_ties"]):
        print(f"level {level}: second-nearest code within 5% of the nearest for {row['within_5pct']:.1%} of items, "
              f"within 20% for {row['within_20pct']:.1%}")
    print(f"one tokenizer epoch ({steps} steps of {per_batch} targets), share of item codes changed:")
    print("lr       " + "  ".join(f"margin {m:<5g}" for m in args.margins))
    for lr, row in result["changed"].items():
        print(f"{float(lr):<8g} " + "  ".join(f"{row[str(m)]:>12.1%}" for m in args.margins))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
