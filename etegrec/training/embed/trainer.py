"""The SASRec stage's trainer and its product: the item embeddings ``embeddings.npy``.

A SASRec trained with cross-entropy at every position of windows cut from each user's training
sequence (a softmax over every item, or with ``embed.loss: sampled`` over drawn ones); early
stopping on validation NDCG@10. Writes the item embedding matrix ``embeddings.npy``
``[n_items + 1, hidden]`` (row 0 = padding), the item map and the valid/test metrics of the best
epoch. This stage is also the project's SASRec baseline.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from etegrec import signals
from etegrec.config import EmbedConfig, RunConfig
from etegrec.data import DataError, SequenceData
from etegrec.models import SASRec

from ..run import (EarlyStopping, EpochProgress, Run, StageTrainer, atomic_write_bytes, atomic_write_text,
                   evaluate_full_ranking, shuffled_batches, train_epoch)

__all__ = ["REPEAT_BIAS_LR", "EmbedTrainer", "load_embeddings", "save_embeddings"]

REPEAT_BIAS_LR = 0.05  # learning rate of SASRec's repeat bias (embed.repeat_bias)


class EmbedTrainer(StageTrainer):
    """Trains SASRec on one dataset and reports through the signals.

    It reads the ``embed`` section (``cfg``) and the seed and step-line interval of the ``run``
    section (``run_cfg``), nothing else of the config.
    """

    def __init__(self, cfg: EmbedConfig, run_cfg: RunConfig, run: Run, data: SequenceData) -> None:
        self.cfg, self.run_cfg, self.run, self.data = cfg, run_cfg, run, data
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
        rng = np.random.default_rng([self.run_cfg.seed, epoch]) if self.cfg.shuffle_ties else None
        windows, counted = self.data.train_windows(self.data.max_his_len + 1, self.cfg.window_stride, rng)
        self.counted = torch.as_tensor(counted)
        return torch.as_tensor(windows)

    @property
    def sasrec(self) -> SASRec:
        return self.model

    def _loss(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        device, cfg = self.run.accelerator.device, self.cfg
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
        return [[self.stage] * self.cfg.epochs]

    def begin(self, resumed: bool) -> None:
        self.model.train()

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None) -> None:
        cfg, acc = self.cfg, self.run.accelerator
        if cfg.shuffle_ties and epoch:
            self.windows = self._windows(epoch)
        batches = shuffled_batches(len(self.windows), cfg.batch_size, seed=self.run_cfg.seed, epoch=epoch,
                                   rank=acc.process_index, world_size=acc.num_processes)
        result = train_epoch(sender=self, stage=self.stage, phase=phase, epoch=epoch, batches=batches,
                             loss_fn=self._loss, optimizers=[self.optimizer], accelerator=acc,
                             log_every=self.run_cfg.log_every, progress=progress,
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


def save_embeddings(run_dir: Path, embeddings: np.ndarray, data: SequenceData) -> None:
    """``embeddings.npy`` ``[n_items + 1, d]`` and ``item_map.json`` (row i = item i = item_map[i-1])."""
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32))
    atomic_write_bytes(run_dir / "embeddings.npy", buffer.getvalue())
    atomic_write_text(run_dir / "item_map.json", json.dumps({"dataset": data.name, "items": list(data.item_map)}))


def load_embeddings(run_dir: Path, data: SequenceData) -> np.ndarray:
    """Read ``embeddings.npy`` of an embed run and check it matches ``data``'s items.

    Raises:
        DataError: missing file or a row count that does not match the item map.
    """
    path = Path(run_dir) / "embeddings.npy"
    if not path.exists():
        raise DataError(f"item embeddings {str(path)!r} do not exist; the run that makes them writes them when it finishes")
    emb = np.load(path)
    if emb.ndim != 2 or emb.shape[0] != data.n_items + 1:
        raise DataError(f"item embeddings {str(path)!r} have shape {emb.shape}, expected "
                        f"[{data.n_items + 1}, d] for {data.n_items} items plus the padding row; "
                        "they were made for other data: delete them to rebuild")
    return emb
