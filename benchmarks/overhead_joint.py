"""Instrumentation overhead of joint training: the same joint epochs with every subscriber and hook
attached (codebook hooks, event log, console, W&B offline) and with none, in one process,
interleaved so that machine noise hits both alike.

    python benchmarks/overhead_joint.py [--rounds 6] [--batches 12] [--config ml-100k]

An "epoch" here is ``--batches`` batches of the config's batch size, run through
``JointTrainer.train_one_epoch`` (so a tokenizer epoch includes its FORGE code refresh and its
``codes_assigned`` signal). Each round runs one tokenizer and one recommender epoch per setting.
Item embeddings are random (speed does not depend on what they learned). Prints the total epoch
time of both settings and the overhead; writes benchmarks/results/overhead_joint.json.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etegrec.config import load_config
from etegrec.hooks import ConsoleSubscriber, EventLog
from etegrec.hooks.codebook import CodebookHooks
from etegrec.hooks.wandb import WandbSubscriber
from etegrec.training.joint import JointTrainer
from etegrec.training.rqvae import build_tokenizer, tokenizer_inputs
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run
from etegrec.training.run.cache import load_stage_data
from etegrec.training.joint import JOINT

RESULTS = Path(__file__).parent / "results"


class NoHooks:
    """What the bare setting has instead of CodebookHooks: nothing is counted or sent."""

    def epoch_end(self, epoch: int) -> None:
        pass

    def pause(self):
        return contextlib.nullcontext()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ml-100k")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of (id, rec) epochs per setting")
    parser.add_argument("--batches", type=int, default=12, help="batches per epoch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = load_config(args.config, ["joint.sample_fraction=1.0", "run.log_every=0"])
    data = load_stage_data(config)
    embeddings = np.random.default_rng(0).normal(size=(data.n_items + 1, 256)).astype(np.float32)
    tokenizer = build_tokenizer(config.tokenizer, embeddings.shape[1])
    tokenizer.kmeans_init_from(torch.as_tensor(tokenizer_inputs(config.tokenizer, embeddings)[1:]))
    times = {"bare": 0.0, "instrumented": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(config, RunOptions(output_dir=Path(tmp), console=False), stage=JOINT)
        trainer = JointTrainer(config, run, data, embeddings, tokenizer.state_dict())
        all_batches = trainer._batches

        def few_batches(epoch: int):
            return all_batches(epoch)[: args.batches]

        trainer._batches = few_batches
        from accelerate import Accelerator
        wandb_acc = Accelerator(cpu=not torch.cuda.is_available(), log_with="wandb")  # the device Run picked
        subscribers = [EventLog(Path(tmp) / "events.jsonl"), ConsoleSubscriber(file=io.StringIO()),
                       WandbSubscriber(accelerator=wandb_acc, project=JOINT.project, run_name="overhead",
                                       config=config.to_dict(), run_dir=tmp, stage="joint", mode="offline",
                                       key_map=JOINT.key_map)]
        for sub in subscribers:
            sub.start()
        trainer.hooks = NoHooks()
        trainer.refresh_codes(0)
        epoch = 0
        for phase in ("id", "rec"):  # warm-up
            trainer.train_one_epoch(epoch, phase)
            epoch += 1
        for _ in range(args.rounds):
            for setting in ("bare", "instrumented"):
                if setting == "instrumented":
                    trainer.hooks = CodebookHooks(trainer.tokenizer, stage="joint", sender=trainer)
                    for sub in subscribers:
                        sub.connect()
                for phase in ("id", "rec"):
                    start = time.perf_counter()
                    trainer.train_one_epoch(epoch, phase)
                    times[setting] += time.perf_counter() - start
                    epoch += 1
                if setting == "instrumented":
                    trainer.hooks.remove()
                    trainer.hooks = NoHooks()
                    for sub in subscribers:
                        sub.disconnect()
        for sub in subscribers:
            sub.finish("completed")
    report = {"config": args.config, "rounds": args.rounds, "batches_per_epoch": args.batches,
              "batch_size": config.joint.batch_size, "threads": args.threads,
              "attached": "codebook hooks, event log, console, W&B offline",
              "seconds_bare": times["bare"], "seconds_instrumented": times["instrumented"],
              "overhead": times["instrumented"] / times["bare"] - 1}
    print(f"joint epochs ({args.rounds} x id + rec, {args.batches} batches of {config.joint.batch_size} each), "
          f"{args.threads} thread(s)")
    print(f"  nothing attached:        {times['bare']:8.2f} s")
    print(f"  everything attached:     {times['instrumented']:8.2f} s")
    print(f"  overhead:                {report['overhead']:+.2%}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead_joint.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
