"""Stage 2: RQ-VAE tokenizer pretraining (``python -m etegrec.training.rqvae``).

Trains the RQ-VAE on the SASRec item embeddings (built first, and cached, when missing). Every
``eval_step`` epochs it tokenizes all items and reports the collision rate and the Gini
coefficient of code usage per layer; keeps the best-collision and the last checkpoint; stops after
``patience`` evaluations without improvement. Every ``restart_dead_every`` epochs, codes that no
item uses are moved onto item residuals: without it, ml-100k's first layer ends with ~17% of its
codes in use (Gini 0.89). W&B project ``ETEGRec-RQVAE-Pretrain``.
"""
from __future__ import annotations

from collections.abc import Sequence

import sys
import time

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm import tqdm

from etegrec import metrics, signals
from etegrec.forge import assign_codes
from etegrec.config import Config
from etegrec.hooks.codebook import CodebookHooks
from etegrec.models import RQVAE

from .cli import stage_main
from .loop import interactive, shuffled_batches, train_epoch
from .run import Run, prepare_process, set_rng_state
from .stages import ensure_embeddings, load_stage_data

__all__ = ["RQVAETrainer", "build_tokenizer", "main", "tokenize_all", "tokenizer_inputs"]

WANDB_PROJECT = "ETEGRec-RQVAE-Pretrain"


def build_tokenizer(config: Config, in_dim: int) -> RQVAE:
    t = config.tokenizer
    return RQVAE(in_dim=in_dim, hidden_dims=t.hidden_dims, e_dim=t.e_dim, num_layers=t.num_layers,
                 codebook_size=t.codebook_size, beta=t.beta, dropout=t.dropout, kmeans_init=t.kmeans_init)


def tokenizer_inputs(config: Config, embeddings: np.ndarray) -> np.ndarray:
    """The item embeddings the tokenizer sees, ``[n_items + 1, d]`` with row 0 (padding) zero.

    With ``tokenizer.standardize`` each dimension is z-scored over the items: SASRec embeddings are
    small (init std 0.02), and an RQ-VAE fed them raw can reconstruct them from almost nothing
    and collapse onto a few codes.
    """
    out = np.asarray(embeddings, dtype=np.float32).copy()
    if config.tokenizer.standardize:
        items = out[1:]
        out[1:] = (items - items.mean(axis=0)) / (items.std(axis=0) + 1e-8)
    out[0] = 0.0
    return out


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


class RQVAETrainer:
    """Pretrains the tokenizer on fixed item embeddings and reports through the signals."""

    stage = "rqvae"

    def __init__(self, config: Config, run: Run, embeddings: np.ndarray, item_ids: Sequence[str] | None = None
                 ) -> None:
        self.config, self.run = config, run
        self.item_ids = item_ids  # raw ids of items 1..n, for item_codes.tsv
        device = run.accelerator.device
        inputs = tokenizer_inputs(config, embeddings)
        self.items = torch.as_tensor(inputs[1:], device=device)  # (n_items, d); row 0 = padding dropped
        self.model = build_tokenizer(config, self.items.shape[1]).to(device)
        if config.tokenizer.kmeans_init:
            self.model.kmeans_init_from(self.items)  # same seed on every rank: same codebooks
        # not DDP-wrapped: train_epoch averages the gradients over processes itself
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.rqvae.lr,
                                           weight_decay=config.rqvae.weight_decay)

    @property
    def tokenizer(self) -> RQVAE:
        return self.model

    def _loss(self, index: np.ndarray) -> dict[str, torch.Tensor]:
        out = self.model(self.items[torch.as_tensor(index, device=self.items.device)])
        return {"loss": out.loss, "loss_recon": out.recon_loss, "loss_commit": out.quant_loss}

    def _state(self, epoch: int, quality: dict[str, float] | None, codes: np.ndarray | None,
               position: dict | None = None) -> dict:
        return {"model": self.tokenizer.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": epoch,
                "quality": quality, "codes": codes, "config": self.config.to_dict(), "position": position}

    def fit(self) -> dict[str, dict[str, float]]:
        """Epochs until ``epochs`` or early stopping. ``last.pt`` is written at every evaluation (and at
        the end of the epoch in progress on Ctrl-C) with the position of the next epoch, for ``--resume``."""
        cfg, acc, run = self.config.rqvae, self.run.accelerator, self.run
        start = time.perf_counter()
        position = {"epoch": 0, "best": float("inf"), "best_quality": {}, "bad": 0}
        if run.resumed:
            state = run.resume_state
            self.tokenizer.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            position = state["position"]
            set_rng_state(state["rng"])
        run.announce_start(self, start_epoch=position["epoch"])
        best, best_quality, bad = position["best"], position["best_quality"], position["bad"]

        def save_last(epoch: int, quality=None, codes=None, *, done: bool = False) -> None:
            at = {"epoch": cfg.epochs if done else epoch + 1, "best": best, "best_quality": best_quality, "bad": bad}
            run.save_checkpoint(self, self._state(epoch, quality, codes, at), "last", epoch=epoch)

        with CodebookHooks(self.tokenizer, stage=self.stage, sender=self) as hooks:
            for epoch in tqdm(range(position["epoch"], cfg.epochs), desc="rqvae epochs", disable=not (run.is_main and interactive()),
                              leave=False, dynamic_ncols=True, initial=position["epoch"], total=cfg.epochs):
                batches = shuffled_batches(len(self.items), cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
                                           rank=acc.process_index, world_size=acc.num_processes)
                result = train_epoch(sender=self, stage=self.stage, phase="rqvae", epoch=epoch, batches=batches,
                                     loss_fn=self._loss, optimizers=[self.optimizer], accelerator=acc,
                                     log_every=self.config.run.log_every, show_progress=False)
                hooks.epoch_end(epoch)
                if cfg.restart_dead_every and (epoch + 1) % cfg.restart_dead_every == 0:
                    self.tokenizer.restart_dead_codes(self.items)  # same seed on every rank: same codes
                losses = {"loss_total": result.losses["loss"], "loss_recon": result.losses["loss_recon"],
                          "loss_commit": result.losses["loss_commit"]}
                signals.epoch_end.send(self, stage=self.stage, phase="rqvae", epoch=epoch, losses=losses,
                                       lr={"lr": self.optimizer.param_groups[0]["lr"]}, seconds=result.seconds,
                                       samples_per_second=result.samples_per_second)
                if (epoch + 1) % cfg.eval_step and epoch + 1 != cfg.epochs:
                    if run.should_stop():  # agreed over processes
                        save_last(epoch)
                        raise KeyboardInterrupt
                    continue
                with hooks.pause():  # evaluation forwards are not training usage
                    codes = tokenize_all(self.tokenizer, self.items)
                quality = code_quality(codes, self.tokenizer.codebook_sizes)
                signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=quality)
                if quality["collision_rate"] < best:
                    best, best_quality, bad = quality["collision_rate"], quality, 0
                    run.save_checkpoint(self, self._state(epoch, quality, codes), "best", epoch=epoch, is_best=True)
                else:
                    bad += 1
                save_last(epoch, quality, codes, done=bad >= cfg.patience)
                if bad >= cfg.patience:
                    break
                run.check_stop()
        best_path = run.checkpoint_dir / "best.pt"
        if self.item_ids is not None and run.is_main:  # the best checkpoint's codes, with the suffix that separates
            best_codes = torch.load(best_path, map_location="cpu", weights_only=False)["codes"]  # collisions
            suffixed = assign_codes(best_codes, self.tokenizer.codebook_size, use_forge=False).codes
            run.write_item_codes(suffixed, self.item_ids)
        run.write_metrics({"valid": best_quality, "best_checkpoint": str(best_path)})
        signals.run_finished.send(self, stage=self.stage, status="completed", best_metrics=best_quality,
                                  best_checkpoint=str(best_path), seconds=time.perf_counter() - start)
        return {"valid": best_quality}


def run_rqvae(config: Config, *, output_dir=None, wandb_mode=None, log_with=("wandb",), subscribers=(),
              accelerator=None, resume: bool = False, rebuild: bool = False):
    """Build (or reuse) the embeddings, then pretrain the tokenizer in its own run directory
    (``rebuild``: train the cached embeddings again first)."""
    prepare_process(config)
    data = load_stage_data(config)
    t = config.tokenizer
    run = Run(config, stage="rqvae", output_dir=output_dir, wandb_mode=wandb_mode, wandb_project=WANDB_PROJECT,
              wandb_run_name=f"{config.data.dataset}_layers{t.num_layers}_edim{t.e_dim}",
              log_with=log_with, subscribers=subscribers, accelerator=accelerator, resume=resume)
    embeddings, _ = ensure_embeddings(config, data, run.accelerator, rebuild=rebuild)
    set_seed(config.run.seed)
    with run:
        return RQVAETrainer(config, run, embeddings, data.item_map).fit()


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.rqvae", __doc__, run_rqvae, argv)


if __name__ == "__main__":
    sys.exit(main())
