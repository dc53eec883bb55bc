"""Stage 1: SASRec collaborative item embeddings (``python -m etegrec.training.embed``).

A SASRec trained with cross-entropy at every position of windows cut from each user's training
sequence (a softmax over every item, or with ``embed.loss: sampled`` over drawn ones); early
stopping on validation NDCG@10. Writes the item embedding matrix ``embeddings.npy``
``[n_items + 1, hidden]`` (row 0 = padding), the item map and the valid/test metrics of the best
epoch. This stage is also the project's SASRec baseline.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from etegrec import signals
from etegrec.config import Config
from etegrec.data import SequenceData
from etegrec.models import SASRec

from .cli import stage_main
from .evaluation import evaluate_full_ranking
from .fit import StageTrainer, fit_stage
from .loop import EpochProgress, shuffled_batches, train_epoch
from .options import RunOptions
from .run import Run, prepare_process
from .rundir import atomic_write_bytes, atomic_write_text
from .stages import load_stage_data
from .stopping import EarlyStopping

__all__ = ["EmbedTrainer", "main", "make_windows", "run_embed"]

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


class EmbedTrainer(StageTrainer):
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
        self.eval_every = cfg.eval_step
        self.stopping = EarlyStopping("ndcg@10", mode="max", patience=cfg.patience)

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
        device, cfg = self.run.accelerator.device, self.config.embed
        negatives = cfg.negatives if cfg.loss == "sampled" else None
        return {"loss": self.model.window_loss(self.windows[index].to(device), self.counted[index].to(device),
                                               negatives=negatives)}

    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        history, target = self.data.split(split)
        metrics = evaluate_full_ranking(self.sasrec.score, history, target, accelerator=self.run.accelerator)
        self.model.train()
        return metrics

    # --- what fit_stage asks for ----------------------------------------------------------------

    def segments(self) -> list[list[str]]:
        return [["embed"] * self.config.embed.epochs]

    def begin(self, resumed: bool) -> None:
        self.model.train()

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None) -> None:
        cfg, acc = self.config.embed, self.run.accelerator
        if cfg.shuffle_ties and epoch:
            self.windows = self._windows(epoch)
        batches = shuffled_batches(len(self.windows), cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
                                   rank=acc.process_index, world_size=acc.num_processes)
        result = train_epoch(sender=self, stage=self.stage, phase=phase, epoch=epoch, batches=batches,
                             loss_fn=self._loss, optimizers=[self.optimizer], accelerator=acc,
                             log_every=self.config.run.log_every, progress=progress,
                             should_stop=self.run.step_stop())
        signals.epoch_end.send(self, stage=self.stage, phase=phase, epoch=epoch, losses=result.losses,
                               lr={"lr": self.optimizer.param_groups[0]["lr"]}, seconds=result.seconds,
                               samples_per_second=result.samples_per_second)

    def validate(self, epoch: int) -> dict[str, float]:
        valid = self.evaluate("valid")
        signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=valid)
        return valid

    def state_dict(self) -> dict:
        return {"model": self.sasrec.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, *, resume: bool = False) -> None:
        self.sasrec.load_state_dict(state["model"])
        if resume:
            self.optimizer.load_state_dict(state["optimizer"])

    def finish(self, best: dict) -> dict:
        test = self.evaluate("test")
        signals.evaluated.send(self, stage=self.stage, split="test", epoch=self.stopping.best_epoch, metrics=test)
        if self.run.is_main:
            save_embeddings(self.run.run_dir, self.sasrec.item_embeddings().detach().cpu().numpy(), self.data)
        return {"valid": self.stopping.best_metrics, "test": test, "best_epoch": self.stopping.best_epoch}

    def fit(self) -> dict[str, dict[str, float]]:
        return fit_stage(self, self.run)


def save_embeddings(run_dir: Path, embeddings: np.ndarray, data: SequenceData) -> None:
    """``embeddings.npy`` ``[n_items + 1, d]`` and ``item_map.json`` (row i = item i = item_map[i-1])."""
    import io
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32))
    atomic_write_bytes(run_dir / "embeddings.npy", buffer.getvalue())
    atomic_write_text(run_dir / "item_map.json", json.dumps({"dataset": data.name, "items": list(data.item_map)}))


def run_embed(config: Config, options: RunOptions | None = None, **option_args):
    """Train SASRec and write its embeddings into its own run directory; ``options`` (or the
    arguments of :meth:`RunOptions.resolve`) say how it runs (``rebuild`` changes nothing here: no
    stage comes before this one)."""
    options = options or RunOptions.resolve(config, **option_args)
    prepare_process(config)
    data = load_stage_data(config)
    with Run(config, options, stage="embed", data_digest=data.digest) as run:
        return EmbedTrainer(config, run, data).fit()


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.embed", __doc__, run_embed, argv)


if __name__ == "__main__":
    sys.exit(main())
