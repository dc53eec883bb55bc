"""Instrumentation overhead of RQ-VAE pretraining: epochs with every subscriber and hook attached
(codebook hooks, event log, console, W&B offline) against epochs with nothing attached, in one
process, interleaved in blocks (in ABBA order) so that machine noise and drift hit both alike.

    python benchmarks/overhead_rqvae.py [--epochs 1000] [--embeddings PATH]

Uses the cached ml-100k SASRec embeddings when given (``--embeddings``), else random ones of the
same shape (1,349 items x 256). The overhead is the median over rounds of (instrumented block's
median epoch / bare block's median epoch) - 1, with a bootstrap 95% interval: pairing each block
with its neighbour cancels the slow drift of a shared machine, which moved whole-run medians by
more than 1% between identical runs. Prints both medians, the overhead and the time of each part
of an epoch; writes benchmarks/results/overhead_rqvae.json.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etegrec import signals
from etegrec.config import load_config
from etegrec.hooks import ConsoleSubscriber, EventLog
from etegrec.hooks.codebook import CodebookHooks
from etegrec.hooks.wandb import WandbSubscriber
from etegrec.training.run.loop import shuffled_batches, train_epoch
from etegrec.training.rqvae import RQVAE, RQVAETrainer
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run

RESULTS = Path(__file__).parent / "results"


PARTS = ("train steps", "CodebookHooks.epoch_end", "epoch_end send")


def one_epoch(trainer: RQVAETrainer, epoch: int, hooks: CodebookHooks | None) -> tuple[float, list[float]]:
    """The body of RQVAETrainer.fit for one epoch, timed from batching to the last signal; also
    the seconds of its parts (:data:`PARTS`)."""
    cfg, acc = trainer.cfg, trainer.run.accelerator
    start = time.perf_counter()
    batches = shuffled_batches(len(trainer.items), cfg.batch_size, seed=0, epoch=epoch)
    result = train_epoch(sender=trainer, stage="rqvae", phase="rqvae", epoch=epoch, batches=batches,
                         loss_fn=trainer._loss, optimizers=[trainer.optimizer], accelerator=acc, show_progress=False)
    trained = time.perf_counter()
    if hooks is not None:
        hooks.epoch_end(epoch)
    counted = time.perf_counter()
    signals.epoch_end.send(trainer, stage="rqvae", phase="rqvae", epoch=epoch, losses=result.losses,
                           lr={"lr": trainer.optimizer.param_groups[0]["lr"]}, seconds=result.seconds,
                           samples_per_second=result.samples_per_second)
    end = time.perf_counter()
    return end - start, [trained - start, counted - trained, end - counted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1000, help="epochs per setting (default 1000; about 2 min)")
    parser.add_argument("--block", type=int, default=1, help="epochs per block before switching setting (default 1)")
    parser.add_argument("--embeddings", help="embeddings.npy of an embed run (default: random)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attach", default="hooks,eventlog,console,wandb",
                        help="what the instrumented setting attaches (comma-separated; default all; 'none' is an A/A check of the method)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    emb = (np.load(args.embeddings) if args.embeddings
           else np.random.default_rng(0).normal(size=(1350, 256)).astype(np.float32))
    config = load_config("ml-100k")
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(config, RunOptions(output_dir=Path(tmp), console=False), stage=RQVAE)
        trainer = RQVAETrainer(config.tokenizer, config.rqvae, config.run, run, emb)
        from accelerate import Accelerator
        wandb_acc = Accelerator(cpu=not torch.cuda.is_available(), log_with="wandb")  # the device Run picked
        attach = set(args.attach.split(","))
        available = {"eventlog": lambda: EventLog(Path(tmp) / "events.jsonl"),
                     "console": lambda: ConsoleSubscriber(file=io.StringIO()),
                     "wandb": lambda: WandbSubscriber(accelerator=wandb_acc, project=RQVAE.project,
                                                      run_name="overhead", config=config.to_dict(), run_dir=tmp,
                                                      stage="rqvae", mode="offline", key_map=RQVAE.key_map)}
        subscribers = [make() for name, make in available.items() if name in attach]
        for sub in subscribers:
            sub.start()
        # one hooks object for the whole run, as a trainer keeps it: detached during bare blocks
        codebook_hooks = CodebookHooks(trainer.tokenizer, stage="rqvae", sender=trainer) if "hooks" in attach else None
        if codebook_hooks:
            codebook_hooks.remove()
        times = {"bare": [], "instrumented": []}
        parts = {"bare": [], "instrumented": []}
        ratios = []  # per round: instrumented block median / bare block median
        epoch = 0
        for _ in range(3):  # warm-up, both settings
            one_epoch(trainer, epoch, None)
            epoch += 1
        rounds = 0
        while len(times["bare"]) < args.epochs:
            # ABBA order: whichever setting runs second in a round would otherwise always meet the
            # same drift (an A/A run with the fixed order read +0.2% to +0.3%)
            order = ("bare", "instrumented") if rounds % 2 == 0 else ("instrumented", "bare")
            rounds += 1
            for setting in order:
                instrumented = setting != "bare"
                hooks = codebook_hooks.attach() if instrumented and codebook_hooks else None
                if instrumented:
                    for sub in subscribers:
                        sub.connect()
                for _ in range(args.block):
                    seconds, split = one_epoch(trainer, epoch, hooks)
                    times[setting].append(seconds)
                    parts[setting].append(split)
                    epoch += 1
                if instrumented:
                    if hooks:
                        hooks.remove()
                    for sub in subscribers:
                        sub.disconnect()
            ratios.append(statistics.median(times["instrumented"][-args.block:])
                          / statistics.median(times["bare"][-args.block:]))
        for sub in subscribers:
            sub.finish("completed")
    bare, inst = statistics.median(times["bare"]), statistics.median(times["instrumented"])
    r = np.array(ratios)
    resampled = np.median(np.random.default_rng(0).choice(r, size=(2000, r.size)), axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5]) - 1
    report = {"epochs_per_setting": len(times["bare"]), "block": args.block, "rounds": len(ratios),
              "threads": args.threads, "attached": args.attach,
              "embeddings": args.embeddings or "random (1350 x 256)",
              "median_epoch_seconds_bare": bare, "median_epoch_seconds_instrumented": inst,
              "overhead": float(np.median(r) - 1), "overhead_95ci": [float(low), float(high)],
              "overhead_of_whole_run_medians": inst / bare - 1,
              "median_part_seconds": {setting: dict(zip(PARTS, np.median(np.array(p), axis=0).tolist()))
                                      for setting, p in parts.items()}}
    print(f"RQ-VAE epoch, median of {report['epochs_per_setting']} per setting, {args.threads} thread(s)")
    print(f"  {'nothing attached:':<24} {bare * 1e3:8.2f} ms")
    print(f"  {args.attach + ':':<24} {inst * 1e3:8.2f} ms")
    print(f"  overhead:                {report['overhead']:+.2%} (95% interval {low:+.2%} to {high:+.2%}; "
          f"median of {len(ratios)} paired rounds)")
    for setting, medians in report["median_part_seconds"].items():
        print(f"  {setting + ' parts:':<24} " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead_rqvae.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
