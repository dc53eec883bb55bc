"""Joint-training speed at the reference's settings: paper config, batch 512, one thread.

    python benchmarks/speed.py [--steps 6] [--config paper] [--batch-size 512] [--threads 1]

Three settings, each in a fresh process (peak memory is per process):

- ``fp32``: the paper config as it is, the reference's numerics;
- ``fp32+ckpt``: the same with ``recommender.gradient_checkpointing=true`` (same gradients);
- ``bf16+ckpt``: the same model with ``joint.mixed_precision=bf16`` (the recommender's training
  forward under bfloat16 autocast) and ``recommender.gradient_checkpointing=true``.

Measures, on ml-100k with random item embeddings and a k-means-initialised tokenizer (speed does
not depend on what the weights learned): training throughput of the tokenizer (id) and
recommender (rec) phases in sequences per second, evaluation throughput of constrained and
unconstrained beam search (beam 20, top 10), and the peak resident memory of the process. Prints
a table and writes benchmarks/results/speed.json.

Reference (public ETEGRec implementation with the FORGE rewrite, same machine type and settings):
tokenizer phase 98.8 seq/s, recommender phase 36.6 seq/s, evaluation 5.5 seq/s, peak RSS 7.5 GiB.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etegrec.config import load_config
from etegrec.hooks.codebook import CodebookHooks
from etegrec.models import beam_search
from etegrec.training.joint import JointTrainer
from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run
from etegrec.training.run.cache import load_stage_data
from etegrec.training.joint import JOINT

RESULTS = Path(__file__).parent / "results"
REFERENCE = {"id": 98.8, "rec": 36.6, "eval": 5.5, "peak_rss_gib": 7.5}
SETTINGS = {
    "fp32": [],
    "fp32+ckpt": ["recommender.gradient_checkpointing=true"],
    "bf16+ckpt": ["joint.mixed_precision=bf16", "recommender.gradient_checkpointing=true"],
}


def train_throughput(trainer: JointTrainer, phase: str, steps: int) -> float:
    """Sequences per second over ``steps`` optimiser steps (after one warm-up step)."""
    trainer.set_phase(phase)
    weights = trainer.weights(phase, epoch=10**6)  # alignment losses on, as after warm-up
    opt = trainer.opt_id if phase == "id" else trainer.opt_rec
    batches = trainer._batches(0)[: steps + 1]

    def step(batch):
        parts = trainer.losses(batch, phase=phase, weights=weights)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()

    step(batches[0])
    _synchronize()
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    _synchronize()
    return sum(len(b) for b in batches[1:]) / (time.perf_counter() - start)


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timer read after it counts that work."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def eval_throughput(trainer: JointTrainer, constrained: bool, n: int, batch_size: int) -> float:
    history, _ = trainer.data.split("valid")
    trainer.recommender.eval()
    _synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            h = torch.as_tensor(history[lo:lo + batch_size], device=trainer.codes.device)
            beam_search(trainer.recommender, trainer.codes[h], h != 0, trainer.trie, beam_size=20, top_k=10,
                        constrained=constrained)
    _synchronize()
    return n / (time.perf_counter() - start)


def measure(args: argparse.Namespace, overrides: list[str]) -> dict:
    """Every figure of one setting, in this process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, [f"joint.batch_size={args.batch_size}", "joint.sample_fraction=1.0",
                                       *overrides])
    data = load_stage_data(config)
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    tokenizer = build_tokenizer(config.tokenizer, embeddings.shape[1])
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
    with tempfile.TemporaryDirectory() as tmp, Run(config, RunOptions(output_dir=Path(tmp), console=False), stage=JOINT) as run:
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        with CodebookHooks(trainer.tokenizer, stage="joint") as trainer.hooks:
            trainer.refresh_codes(0)
            epoch_batches = len(trainer._batches(0))
            report = {
                "config": args.config, "overrides": overrides, "batch_size": args.batch_size,
                "threads": args.threads,
                "train_id_seq_per_s": train_throughput(trainer, "id", args.steps),
                "train_rec_seq_per_s": train_throughput(trainer, "rec", args.steps),
                "eval_constrained_seq_per_s": eval_throughput(trainer, True, args.eval_users, 256),
                "eval_unconstrained_seq_per_s": eval_throughput(trainer, False, args.eval_users, 256),
            }
    n_train = len(data.train_target)
    report["rec_epoch_seconds"] = n_train / report["train_rec_seq_per_s"]
    report["id_epoch_seconds"] = n_train / report["train_id_seq_per_s"]
    report["batches_per_epoch"] = epoch_batches
    report["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="paper")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per phase")
    parser.add_argument("--eval-users", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)  # one setting, JSON out
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args, SETTINGS[args.child])))
        return
    reports = {}
    for name in args.settings:  # a fresh process each: peak RSS is per process
        child = [sys.executable, __file__, "--child", name, "--config", args.config, "--batch-size",
                 str(args.batch_size), "--steps", str(args.steps), "--eval-users", str(args.eval_users),
                 "--threads", str(args.threads)]
        out = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout
        reports[name] = json.loads(out.strip().splitlines()[-1])
    keys = [("training, tokenizer phase (seq/s)", "train_id_seq_per_s", "id"),
            ("training, recommender phase (seq/s)", "train_rec_seq_per_s", "rec"),
            ("evaluation, constrained (seq/s)", "eval_constrained_seq_per_s", "eval"),
            ("evaluation, unconstrained (seq/s)", "eval_unconstrained_seq_per_s", "eval"),
            ("peak resident memory (GiB)", "peak_rss_gib", "peak_rss_gib")]
    print(f"{args.config} config, batch {args.batch_size}, {args.threads} thread(s), ml-100k")
    print(f"{'figure':<40}" + "".join(f"{name:>12}{'ratio':>9}" for name in reports) + f"{'reference':>11}")
    for label, key, ref in keys:
        cells = "".join(f"{r[key]:>12.1f}{r[key] / REFERENCE[ref]:>8.2f}x" for r in reports.values())
        print(f"{label:<40}{cells}{REFERENCE[ref]:>11.1f}")
    for name, r in reports.items():
        print(f"{name}: seconds per epoch (all samples): id {r['id_epoch_seconds']:.0f}, rec {r['rec_epoch_seconds']:.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps({"reference": REFERENCE, "settings": reports}, indent=2))


if __name__ == "__main__":
    main()
