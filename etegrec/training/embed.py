"""Stage 1: SASRec collaborative item embeddings (``python -m etegrec.training.embed``).

A SASRec trained with full-softmax cross-entropy at every position of windows cut from each
user's training sequence; early stopping on validation NDCG@10. Writes the item embedding matrix
``embeddings.npy`` ``[n_items + 1, hidden]`` (row 0 = padding), the item map and the
valid/test metrics of the best epoch. This stage is also the project's SASRec baseline.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from etegrec import signals
from etegrec.config import Config
from etegrec.data import SequenceData
from etegrec.models import SASRec

from .cli import stage_main
from .evaluation import evaluate_full_ranking
from .loop import EpochProgress, TrainingInterrupted, shuffled_batches, train_epoch
from .run import Run, atomic_write_bytes, atomic_write_text, prepare_process, set_rng_state
from .stages import load_stage_data

__all__ = ["EmbedTrainer", "WANDB_PROJECT", "main", "make_windows", "run_embed"]

WANDB_PROJECT = "ETEGRec-Embed"  # the SASRec stage run on its own; as a cached stage of the pipeline it logs no W&B run

REPEAT_BIAS_LR = 0.05  # learning rate of SASRec's repeat bias (embed.repeat_bias)


def make_windows(sequences: list[np.ndarray], length: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut sequences into left-padded windows of ``length`` items, from the end backwards.

    A window's last ``stride`` targets are new (``window_loss`` predicts ``w[1:]`` from ``w[:-1]``),
    so every item after a sequence's first is a target exactly once. The default stride
    ``length - 1`` makes consecutive windows overlap by one item; a smaller stride gives targets
    longer histories (closer to evaluation, where the history is full) at the cost of more windows.

    Returns ``(windows [n, length], counted [n])``: ``counted`` is how many trailing targets of
    each window are to be scored (all of them for a sequence's first window).
    """
    stride = length - 1 if stride is None else stride
    if not 1 <= stride <= length - 1:
        raise ValueError(f"window stride={stride!r} must lie between 1 and the window's targets ({length - 1}).")
    rows, counted = [], []
    for seq in sequences:
        end = len(seq)
        while end > 1:
            start = max(0, end - length)
            window = seq[start:end]
            rows.append(np.pad(window, (length - len(window), 0)))
            counted.append(length - 1 if start == 0 else stride)
            if start == 0:
                break
            end -= stride
    windows = np.asarray(rows, dtype=np.int64).reshape(-1, length)
    return windows, np.asarray(counted, dtype=np.int64)


class EmbedTrainer:
    """Trains SASRec on one dataset and reports through the signals."""

    stage = "embed"

    def __init__(self, config: Config, run: Run, data: SequenceData) -> None:
        self.config, self.run, self.data = config, run, data
        cfg = config.embed
        # not DDP-wrapped: train_epoch averages the gradients over processes itself
        self.model = SASRec(n_items=data.n_items, hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            dropout=cfg.dropout, max_len=data.max_his_len,
                            tied_output=cfg.tied_output, repeat_bias=cfg.repeat_bias).to(run.accelerator.device)
        # The repeat bias is one scalar in logit units. Adam moves a parameter by about its learning
        # rate per step, so at 1e-3 it would still be near -1 after a whole run: it gets its own rate.
        bias = [self.model.repeat_bias] if self.model.repeat_bias is not None else []
        rest = [p for p in self.model.parameters() if all(p is not b for b in bias)]
        groups = [{"params": rest}] + ([{"params": bias, "lr": REPEAT_BIAS_LR, "weight_decay": 0.0}] if bias else [])
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.windows = self._windows(epoch=0)

    def _windows(self, epoch: int) -> torch.Tensor:
        """Training windows; with ``shuffle_ties`` re-cut every epoch from a new order of tied items."""
        rng = np.random.default_rng([self.config.run.seed, epoch]) if self.config.embed.shuffle_ties else None
        windows, counted = make_windows(self.data.train_sequences(rng), self.data.max_his_len + 1,
                                        self.config.embed.window_stride)
        self.counted = torch.as_tensor(counted)
        return torch.as_tensor(windows)

    @property
    def sasrec(self) -> SASRec:
        return self.model

    def _loss(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        device = self.run.accelerator.device
        return {"loss": self.model.window_loss(self.windows[index].to(device), self.counted[index].to(device))}

    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        history, target = self.data.split(split)
        metrics = evaluate_full_ranking(self.sasrec.score, history, target, accelerator=self.run.accelerator)
        self.model.train()
        return metrics

    def _state(self, epoch: int, position: dict | None = None, progress: EpochProgress | None = None) -> dict:
        return {"model": self.sasrec.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "position": position, "progress": progress.state_dict() if progress else None}

    def fit(self) -> dict[str, dict[str, float]]:
        """Epochs until ``epochs`` or early stopping; ``last.pt`` after every epoch and on Ctrl-C (``--resume``)."""
        cfg, acc, run = self.config.embed, self.run.accelerator, self.run
        start = time.perf_counter()
        position, progress = {"epoch": 0, "best": -1.0, "best_epoch": -1, "best_valid": {}, "bad": 0}, None
        if run.resumed:
            state = run.resume_state
            self.sasrec.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            position = state["position"]
            progress = EpochProgress.from_state(state["progress"], acc.device)
            set_rng_state(state["rng"])
        run.announce_start(self, start_epoch=position["epoch"])
        best, best_epoch, best_valid, bad = (position[k] for k in ("best", "best_epoch", "best_valid", "bad"))

        def where(next_epoch: int) -> dict:
            return {"epoch": next_epoch, "best": best, "best_epoch": best_epoch, "best_valid": best_valid, "bad": bad}

        self.model.train()
        for epoch in range(position["epoch"], cfg.epochs):
            if cfg.shuffle_ties and epoch:
                self.windows = self._windows(epoch)
            batches = shuffled_batches(len(self.windows), cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
                                       rank=acc.process_index, world_size=acc.num_processes)
            try:
                result = train_epoch(sender=self, stage=self.stage, phase="embed", epoch=epoch, batches=batches,
                                     loss_fn=self._loss, optimizers=[self.optimizer], accelerator=acc,
                                     log_every=self.config.run.log_every, progress=progress,
                                     should_stop=run.step_stop())
            except TrainingInterrupted as stop:
                run.save_checkpoint(self, self._state(epoch, where(epoch), stop.progress), "last", epoch=epoch)
                raise
            progress = None
            signals.epoch_end.send(self, stage=self.stage, phase="embed", epoch=epoch, losses=result.losses,
                                   lr={"lr": self.optimizer.param_groups[0]["lr"]}, seconds=result.seconds,
                                   samples_per_second=result.samples_per_second)
            if (epoch + 1) % cfg.eval_step == 0 or epoch + 1 == cfg.epochs:
                valid = self.evaluate("valid")
                signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=valid)
                if valid["ndcg@10"] > best:
                    best, best_epoch, best_valid, bad = valid["ndcg@10"], epoch, valid, 0
                    run.save_checkpoint(self, self._state(epoch), "best", epoch=epoch, is_best=True)
                else:
                    bad += 1
            done = bad >= cfg.patience
            run.save_checkpoint(self, self._state(epoch, where(cfg.epochs if done else epoch + 1)), "last",
                                epoch=epoch)
            if done:
                break
            run.check_stop()
        return self._finish(best_epoch, best_valid, start)

    def _finish(self, best_epoch: int, best_valid: dict, start: float) -> dict[str, dict[str, float]]:
        run, acc = self.run, self.run.accelerator
        acc.wait_for_everyone()
        best_path = run.checkpoint_dir / "best.pt"
        state = torch.load(best_path, map_location="cpu", weights_only=False)  # our own file (it holds RNG states)
        self.sasrec.load_state_dict(state["model"])
        test = self.evaluate("test")
        signals.evaluated.send(self, stage=self.stage, split="test", epoch=best_epoch, metrics=test)
        if run.is_main:
            save_embeddings(run.run_dir, self.sasrec.item_embeddings().detach().cpu().numpy(), self.data)
        run.write_metrics({"valid": best_valid, "test": test, "best_epoch": best_epoch})
        signals.run_finished.send(self, stage=self.stage, status="completed", best_metrics=best_valid,
                                  best_checkpoint=str(best_path), seconds=time.perf_counter() - start)
        return {"valid": best_valid, "test": test}


def save_embeddings(run_dir: Path, embeddings: np.ndarray, data: SequenceData) -> None:
    """``embeddings.npy`` ``[n_items + 1, d]`` and ``item_map.json`` (row i = item i = item_map[i-1])."""
    import io
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32))
    atomic_write_bytes(run_dir / "embeddings.npy", buffer.getvalue())
    atomic_write_text(run_dir / "item_map.json", json.dumps({"dataset": data.name, "items": list(data.item_map)}))


def run_embed(config: Config, *, output_dir=None, wandb_mode=None, log_with=("wandb",), subscribers=(),
              resume: bool = False, rebuild: bool = False):
    """Train SASRec and write its embeddings into its own run directory (``rebuild``: no stage comes
    before it, so it changes nothing)."""
    prepare_process(config)
    data = load_stage_data(config)
    with Run(config, stage="embed", output_dir=output_dir, wandb_mode=wandb_mode, wandb_project=WANDB_PROJECT,
             wandb_run_name=config.run.name, log_with=log_with, subscribers=subscribers, resume=resume) as run:
        return EmbedTrainer(config, run, data).fit()


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.embed", __doc__, run_embed, argv)


if __name__ == "__main__":
    sys.exit(main())
