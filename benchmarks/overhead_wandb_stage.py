"""W&B's cost over a whole RQ-VAE stage: the stage trained with W&B offline and with no tracker
(event log and codebook hooks attached in both), alternating in ABBA order, each stage in a
fresh process: the W&B stage pays W&B's start-up as a run does.

    python benchmarks/overhead_wandb_stage.py [--epochs 1000] [--pairs 2]

Each stage is ``RQVAETrainer.fit`` inside its ``Run``: every epoch, every evaluation (each
``rqvae.eval_step`` epochs), the checkpoints, and W&B's start and finish. Embeddings are random, of
the ml-100k shape (1,350 items x 256). The overhead is the median over pairs of (W&B stage /
bare stage) - 1. Prints every stage's seconds; writes benchmarks/results/overhead_wandb_stage.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from etegrec.config import load_config
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run
from etegrec.training.rqvae import RQVAE, RQVAETrainer

RESULTS = Path(__file__).parent / "results"


def stage_seconds(config, embeddings: np.ndarray, mode: str) -> float:
    """Seconds of one RQ-VAE stage, W&B in ``mode`` (``disabled``: no tracker at all)."""
    with tempfile.TemporaryDirectory() as tmp:
        log_with = ("wandb",) if mode != "disabled" else ()
        run = Run(config, RunOptions(output_dir=Path(tmp), wandb_mode=mode, log_with=log_with, console=False),
                  stage=RQVAE)
        set_seed(config.run.seed)
        start = time.perf_counter()
        with run:
            RQVAETrainer(config.tokenizer, config.rqvae, config.run, run, embeddings).fit()
        return time.perf_counter() - start


def stage_in_a_new_process(args: argparse.Namespace, mode: str) -> float:
    command = [sys.executable, __file__, "--single", mode, "--epochs", str(args.epochs), "--threads", str(args.threads)]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000, help="RQ-VAE epochs per stage (default 1000, the ml-100k config)")
    parser.add_argument("--pairs", type=int, default=2, help="pairs of stages, W&B and bare (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--single", choices=("offline", "disabled"), help=argparse.SUPPRESS)  # one stage, here
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config("ml-100k", [f"rqvae.epochs={args.epochs}", "rqvae.patience=1000"])
    if args.single:
        embeddings = np.random.default_rng(0).normal(size=(1350, 256)).astype(np.float32)
        print(stage_seconds(config, embeddings, args.single))
        return
    seconds: dict[str, list[float]] = {"offline": [], "disabled": []}
    for pair in range(args.pairs):
        # ABBA: whichever setting always ran second would always meet the same drift
        for mode in ("offline", "disabled") if pair % 2 == 0 else ("disabled", "offline"):
            seconds[mode].append(stage_in_a_new_process(args, mode))
            print(f"pair {pair}: W&B {mode:<8} {seconds[mode][-1]:7.2f} s", flush=True)
    ratios = [w / b for w, b in zip(seconds["offline"], seconds["disabled"])]
    report = {"epochs": args.epochs, "eval_step": config.rqvae.eval_step, "pairs": args.pairs,
              "threads": args.threads, "seconds_wandb_offline": seconds["offline"],
              "seconds_no_tracker": seconds["disabled"], "overhead": statistics.median(ratios) - 1,
              "overhead_per_pair": [r - 1 for r in ratios]}
    print(f"RQ-VAE stage of {args.epochs} epochs: W&B offline {statistics.median(seconds['offline']):.2f} s, "
          f"no tracker {statistics.median(seconds['disabled']):.2f} s; overhead {report['overhead']:+.2%} "
          f"(pairs: {', '.join(f'{r - 1:+.2%}' for r in ratios)})")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead_wandb_stage.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
