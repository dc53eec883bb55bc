"""The RQ-VAE tokenizer's pretraining on fixed item embeddings (the ``rqvae`` stage's trainer).

Every ``eval_step`` epochs it tokenizes all items and reports the collision rate and the Gini
coefficient of code usage per layer; keeps the best-collision and the last checkpoint; stops after
``patience`` evaluations without improvement. Every ``restart_dead_every`` epochs, codes that no
item uses are moved onto item residuals: without it, ml-100k's first layer ends with ~17% of its
codes in use (Gini 0.89).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from etegrec import metrics, signals
from etegrec.config import RQVAEConfig, RunConfig, TokenizerConfig
from etegrec.forge import assign_codes
from etegrec.hooks.codebook import CodebookHooks
from etegrec.models import RQVAE

from ..run import EarlyStopping, EpochProgress, Run, StageTrainer, shuffled_batches, train_epoch
from .tokenizer import build_tokenizer, tokenizer_inputs

__all__ = ["RQVAETrainer", "code_quality", "tokenize_all"]


@torch.no_grad()
def tokenize_all(model: RQVAE, items: torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """RQ codes ``[n, L]`` of every row of ``items`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    codes = torch.cat([model(items[i:i + batch_size]).codes for i in range(0, len(items), batch_size)])
    model.train(was_training)
    return codes.cpu().numpy()


def code_quality(codes: np.ndarray, codebook_sizes: list[int]) -> dict[str, float]:
    """Collision rate of the full codes and the Gini of each layer's usage, plus their mean."""
    ginis = [metrics.gini(np.bincount(codes[:, i], minlength=k)) for i, k in enumerate(codebook_sizes)]
    out = {"collision_rate": metrics.collision_rate(codes), "gini_coefficient": float(np.mean(ginis))}
    out.update({f"gini_layer{i}": g for i, g in enumerate(ginis)})
    return out


class RQVAETrainer(StageTrainer):
    """Pretrains the tokenizer on fixed item embeddings and reports through the signals.

    It reads the ``tokenizer`` and ``rqvae`` sections and the seed and step-line interval of the
    ``run`` section (``run_cfg``), nothing else of the config.
    """

    save_last = "evaluation"  # hundreds of sub-second epochs: a checkpoint at every evaluation
    epoch_bar = True

    def __init__(self, tokenizer: TokenizerConfig, cfg: RQVAEConfig, run_cfg: RunConfig, run: Run,
                 embeddings: np.ndarray, item_ids: Sequence[str] | None = None, *,
                 attributes: np.ndarray | None = None) -> None:
        self.cfg, self.run_cfg, self.run = cfg, run_cfg, run
        self.item_ids = item_ids  # raw ids of items 1..n, for item_codes.tsv
        device = run.accelerator.device
        inputs = tokenizer_inputs(tokenizer, embeddings, attributes)
        self.items = torch.as_tensor(inputs[1:], device=device)  # (n_items, d); row 0 = padding dropped
        self.model = build_tokenizer(tokenizer, self.items.shape[1]).to(device)
        if tokenizer.kmeans_init:
            self.model.kmeans_init_from(self.items)  # same seed on every rank: same codebooks
        # not DDP-wrapped: train_epoch averages the gradients over processes itself
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.eval_every = cfg.eval_step
        self.stopping = EarlyStopping("collision_rate", mode="min", patience=cfg.patience)
        self.quality: dict[str, float] | None = None  # of the last evaluation, with its codes
        self.codes: np.ndarray | None = None
        self.hooks = CodebookHooks(self.model, stage=self.stage, sender=self)

    @property
    def tokenizer(self) -> RQVAE:
        return self.model

    def _loss(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.model(self.items[torch.as_tensor(index, device=self.items.device)])
        return {"loss": out.loss, "loss_recon": out.recon_loss, "loss_commit": out.quant_loss}

    # --- what fit_stage asks for ----------------------------------------------------------------

    def segments(self) -> list[list[str]]:
        return [[self.stage] * self.cfg.epochs]

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None) -> None:
        cfg, acc = self.cfg, self.run.accelerator
        batches = shuffled_batches(len(self.items), cfg.batch_size, seed=self.run_cfg.seed, epoch=epoch,
                                   rank=acc.process_index, world_size=acc.num_processes)
        result = train_epoch(sender=self, stage=self.stage, phase=phase, epoch=epoch, batches=batches,
                             loss_fn=self._loss, optimizers=[self.optimizer], accelerator=acc,
                             log_every=self.run_cfg.log_every, show_progress=False, progress=progress,
                             should_stop=self.run.step_stop())
        self.hooks.epoch_end(epoch)
        if cfg.restart_dead_every and (epoch + 1) % cfg.restart_dead_every == 0:
            self.tokenizer.restart_dead_codes(self.items)  # same seed on every rank: same codes
        signals.epoch_end.send(self, stage=self.stage, phase=phase, epoch=epoch, losses=result.losses,
                               lr={"lr": self.optimizer.param_groups[0]["lr"]}, seconds=result.seconds,
                               samples_per_second=result.samples_per_second)

    def validate(self, epoch: int) -> dict[str, float]:
        with self.hooks.pause():  # evaluation forwards are not training usage
            self.codes = tokenize_all(self.tokenizer, self.items)
        self.quality = code_quality(self.codes, self.tokenizer.codebook_sizes)
        signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=self.quality)
        return self.quality

    def state_dict(self) -> dict:
        return {"model": self.tokenizer.state_dict(), "optimizer": self.optimizer.state_dict(),
                "quality": self.quality, "codes": None if self.codes is None else torch.from_numpy(self.codes)}

    def load_state_dict(self, state: dict, *, resume: bool = False) -> None:
        self.tokenizer.load_state_dict(state["model"])
        if resume:
            self.optimizer.load_state_dict(state["optimizer"])
            codes = state.get("codes")  # a tensor (an array in checkpoint format 1)
            self.quality, self.codes = state.get("quality"), None if codes is None else np.asarray(codes)

    def finish(self, best: dict) -> dict:
        best_path = self.run.checkpoint_dir / "best.pt"
        if self.item_ids is not None and self.run.is_main:  # the best codes, with the suffix that separates collisions
            suffixed = assign_codes(np.asarray(best["codes"]), self.tokenizer.codebook_size, use_forge=False).codes
            self.run.write_item_codes(suffixed, self.item_ids)
        return {"valid": self.stopping.best_metrics, "best_checkpoint": str(best_path)}
