"""Stage 3: ETEGRec joint training (``python -m etegrec.training.joint``), the main job.

The tokenizer (RQ-VAE) and a T5 generative recommender are trained in cycles of ``cycle`` epochs:
the first epoch of a cycle trains the tokenizer with the recommender frozen (phase ``id``), the
others train the recommender with the tokenizer frozen (phase ``rec``). Item codes come from
``etegrec.forge.get_code`` (with FORGE) at the start and after every tokenizer epoch. Validation by
beam search, early stopping on NDCG@10, optional fine-tuning of the recommender alone on fixed
codes, and a final test with the best checkpoint. With no arguments, the whole pipeline runs on
ml-100k: item embeddings and the pretrained tokenizer are built first (and cached) when missing.
"""
from __future__ import annotations

import math
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from transformers import get_cosine_schedule_with_warmup

from etegrec import signals
from etegrec.config import Config, ConfigError
from etegrec.data import SequenceData
from etegrec.forge import get_code
from etegrec.hooks.codebook import CodebookHooks
from etegrec.hooks.wandb import JOINT_PROJECT
from etegrec.metrics import ranking_metrics
from etegrec.models import CodeTrie, RecommenderOutput, T5Recommender, beam_search, code_loss

from .cli import stage_main
from .evaluation import gather_ranks, shard_bounds
from .probing import Prober
from .embed import make_windows
from .loop import EpochProgress, TrainingInterrupted, shuffled_batches, train_epoch
from .rqvae import build_tokenizer, tokenizer_inputs
from .run import Run, prepare_process, set_rng_state
from .stages import ensure_embeddings, ensure_tokenizer, load_stage_data

__all__ = ["JointTrainer", "beam_recommend", "build_recommender", "check_same_on_every_rank", "info_nce", "main", "phase_of", "run_joint", "symmetric_kl"]

REPEAT_BIAS_LR = 0.05  # as the SASRec stage's (etegrec.training.embed.REPEAT_BIAS_LR)

LOSS_PARTS = {"id": ("vq_loss", "code_loss", "kl_loss", "dec_cl_loss"),
              "rec": ("code_loss", "kl_loss", "dec_cl_loss"),
              "finetune": ("code_loss",)}


def build_recommender(config: Config, tokenizer, *, semantic_dim: int) -> T5Recommender:
    """The T5 recommender the config describes, for ``tokenizer``'s codes (its codes plus the suffix)."""
    r, cfg = config.recommender, config.joint
    return T5Recommender(
        code_num=tokenizer.codebook_size, code_length=tokenizer.code_length + 1,
        num_layers=r.num_layers, num_decoder_layers=r.num_decoder_layers, d_model=r.d_model, d_ff=r.d_ff,
        num_heads=r.num_heads, d_kv=r.d_kv, dropout=r.dropout, feed_forward_proj=r.feed_forward_proj,
        latent_dim=config.tokenizer.e_dim, semantic_dim=semantic_dim,
        gradient_checkpointing=r.gradient_checkpointing, encoder_input=r.encoder_input,
        max_history=config.data.max_his_len, repeat_bias=r.repeat_bias, causal_encoder=cfg.targets == "all",
        # under bf16 autocast SDPA falls back to an fp32 path on CPU; plain attention is ~1.7x faster
        attn_implementation="eager" if cfg.mixed_precision == "bf16" else "sdpa")


@torch.no_grad()
def beam_recommend(recommender: T5Recommender, codes: torch.Tensor, trie: CodeTrie, history: np.ndarray,
                   cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k item ids and scores, (n, top_k) each, of left-padded ``history`` [n, H] by the beam search
    of evaluation (``cfg``: the joint config's beam_size, top_k, constrained, renormalize, eval_batch_size);
    -1 / -inf where fewer items were reached. ``codes`` is (n_items + 1, L + 1) with row 0 padding."""
    recommender.eval()
    items, scores = [], []
    for lo in range(0, len(history), cfg.eval_batch_size):
        h = torch.as_tensor(history[lo:lo + cfg.eval_batch_size], device=codes.device)
        out = beam_search(recommender, codes[h], h != 0, trie, beam_size=cfg.beam_size, top_k=cfg.top_k,
                          constrained=cfg.constrained, renormalize=cfg.renormalize and cfg.constrained)
        items.append(out.items)
        scores.append(out.scores)
    if not items:
        empty = torch.empty(0, cfg.top_k, device=codes.device)
        return empty.long(), empty
    return torch.cat(items), torch.cat(scores)


def phase_of(epoch: int, cycle: int, train_tokenizer: bool = True) -> str:
    """``id`` for the first epoch of every cycle of ``cycle`` epochs, ``rec`` for the others
    (every epoch when the tokenizer is not trained)."""
    return "id" if train_tokenizer and epoch % cycle == 0 else "rec"


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) + KL(b||a) of two (batch, K) logit sets, mean over the batch."""
    log_a, log_b = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
    kl_ab = F.kl_div(log_b, log_a, log_target=True, reduction="batchmean")
    kl_ba = F.kl_div(log_a, log_b, log_target=True, reduction="batchmean")
    return kl_ab + kl_ba


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between rows of ``a`` and ``b`` (batch, d): row i matches row i."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature  # (batch, batch)
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def check_same_on_every_rank(tensor: torch.Tensor, accelerator, *, what: str) -> None:
    """Verify that every process holds the same ``tensor`` (one small gather of a digest).

    Raises:
        RuntimeError: the ranks disagree, naming which ranks hold which digest.
    """
    if accelerator.num_processes == 1:
        return
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    digests = gather_object([digest])
    if len(set(digests)) > 1:
        raise RuntimeError(f"{what} differ between processes (digest by rank: {digests}); every rank must "
                           "compute the same codes: check that all ranks got the same seed and data")


class JointTrainer:
    """ETEGRec's alternating optimisation; talks only through the signals."""

    stage = "joint"

    def __init__(self, config: Config, run: Run, data: SequenceData, embeddings: np.ndarray,
                 tokenizer_state: dict) -> None:
        self.config, self.run, self.data = config, run, data
        acc, cfg = run.accelerator, config.joint
        device = acc.device
        self.item_emb = torch.as_tensor(tokenizer_inputs(config, embeddings), device=device)  # (n_items + 1, d)
        self.tokenizer = build_tokenizer(config, self.item_emb.shape[1]).to(device)
        self.tokenizer.load_state_dict(tokenizer_state)
        self.recommender = build_recommender(config, self.tokenizer, semantic_dim=self.item_emb.shape[1]).to(device)
        self._samples(epoch=0)
        self.opt_id = torch.optim.AdamW(self.tokenizer.parameters(), lr=cfg.lr_id, weight_decay=cfg.weight_decay)
        self.opt_rec = torch.optim.AdamW(self._rec_param_groups(), lr=cfg.lr_rec, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self._batches(0))
        id_epochs = sum(phase_of(e, cfg.cycle, cfg.train_tokenizer) == "id" for e in range(cfg.epochs))
        rec_epochs = cfg.epochs - id_epochs + cfg.finetune_epochs
        self.sched_id = self._schedule(self.opt_id, id_epochs)
        self.sched_rec = self._schedule(self.opt_rec, rec_epochs)
        self.codes: torch.Tensor | None = None  # (n_items + 1, L + 1), row 0 = padding
        self.trie: CodeTrie | None = None
        self.codes_changed = 1.0  # share of items whose code changed at the last refresh
        self.prober = Prober(data, users=cfg.probe_users, seed=config.run.seed) if cfg.probe_users else None

    # --- pieces of the loop -------------------------------------------------------------------

    def _rec_param_groups(self) -> list[dict]:
        """The recommender's parameters; its repeat bias (one number per code position, in logit units)
        in a group of its own at :data:`REPEAT_BIAS_LR` without weight decay: Adam moves a parameter by
        about its learning rate per step, and at the recommender's rate the bias would need thousands of
        steps to reach the large negative value ml-100k asks for (the SASRec stage's finding)."""
        bias = self.recommender.repeat_logit
        rest = [p for p in self.recommender.parameters() if p is not bias]
        groups = [{"params": rest}]
        if bias is not None:
            groups.append({"params": [bias], "lr": REPEAT_BIAS_LR, "weight_decay": 0.0})
        return groups

    def _samples(self, epoch: int) -> None:
        """The training samples of ``epoch``: with ``joint.shuffle_ties``, same-timestamp items are
        reordered at random (seeded by the run's seed and the epoch) before the prefixes are cut."""
        rng = np.random.default_rng([self.config.run.seed, epoch]) if self.config.joint.shuffle_ties else None
        device = self.run.accelerator.device
        if self.config.joint.targets == "all":  # windows: a target after every item (as the SASRec stage)
            length = self.data.max_his_len
            windows, counted = make_windows(self.data.train_sequences(rng), length + 1,
                                            self.config.joint.window_stride or length)
            self.windows = torch.as_tensor(windows, device=device)  # (n, W + 1)
            self.counted = torch.as_tensor(counted, device=device)  # (n,) trailing targets to score
            self.n_samples = len(windows)
            return
        history, target = self.data.train_samples(rng)
        self.history = torch.as_tensor(history, device=device)
        self.target = torch.as_tensor(target, device=device)
        self.n_samples = len(target)

    def _schedule(self, optimizer, epochs: int):
        total = max(1, epochs * self.steps_per_epoch)
        warmup = min(total // 2, round(self.config.joint.warmup_epochs * self.steps_per_epoch))
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        cfg, acc = self.config.joint, self.run.accelerator
        batches = shuffled_batches(self.n_samples, cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
                                   rank=acc.process_index, world_size=acc.num_processes)
        keep = math.ceil(len(batches) * cfg.sample_fraction)  # a fresh random share of samples each epoch
        return batches[:keep]

    def weights(self, phase: str, epoch: int) -> dict[str, float]:
        """Loss weights in force for ``phase`` at ``epoch`` (alignment losses off during warm-up)."""
        cfg = self.config.joint
        prefix = "id" if phase == "id" else "rec"
        weights = {part: getattr(cfg, f"{prefix}_{part.removesuffix('_loss')}_weight") for part in LOSS_PARTS[phase]}
        if epoch < cfg.warm_epoch:
            weights.update({k: 0.0 for k in ("kl_loss", "dec_cl_loss") if k in weights})
        return weights

    def _autocast(self):
        """bfloat16 autocast for the recommender's training forward when ``joint.mixed_precision`` is bf16
        (weights, optimiser and losses stay fp32; evaluation always runs in fp32)."""
        return torch.autocast(self.run.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.config.joint.mixed_precision == "bf16")

    def set_phase(self, phase: str) -> None:
        """Only the model of ``phase`` trains; the other is frozen and in eval mode."""
        train_tokenizer = phase == "id"
        self.tokenizer.requires_grad_(train_tokenizer).train(train_tokenizer)
        self.recommender.requires_grad_(not train_tokenizer).train(not train_tokenizer)

    def refresh_codes(self, epoch: int) -> None:
        """Recompute the item codes (FORGE) for use from ``epoch`` on, and the prefix trie."""
        cfg = self.config.joint
        with self.hooks.pause():
            result = get_code(self.tokenizer, self.item_emb, epoch=epoch, use_forge=cfg.use_forge,
                              policy=cfg.forge_policy, previous=self.codes, sender=self)
        first = self.codes is None  # the start's assignment changes nothing that was learned
        self.codes = result.codes.to(self.run.accelerator.device)
        self.codes_changed = 0.0 if first else result.assignment.changed / max(1, len(result.assignment.codes))
        check_same_on_every_rank(self.codes, self.run.accelerator, what=f"item codes for epoch {epoch}")
        self.trie = CodeTrie(self.codes[1:], code_num=self.recommender.code_num).to(self.run.accelerator.device)

    def losses(self, index: np.ndarray, *, phase: str, weights: dict[str, float]) -> dict[str, torch.Tensor]:
        """Loss parts of one batch and their weighted sum ``loss``; both phases use this."""
        idx = torch.as_tensor(index, device=self.codes.device)
        with torch.set_grad_enabled(phase != "id"), self._autocast():  # the frozen recommender needs no graph
            out, target = self._forward(idx)  # one row per scored target
        out = RecommenderOutput(*(t.float() for t in out))  # the losses in fp32 under mixed precision too
        target_codes = self.codes[target]  # (N, L + 1)
        parts = {"code_loss": code_loss(self._normalizable(out.logits, target_codes), target_codes)}
        align = weights.get("kl_loss", 0) > 0 or weights.get("dec_cl_loss", 0) > 0
        if phase == "id" or align:
            with torch.set_grad_enabled(phase == "id"):  # the frozen tokenizer only gives targets
                tok = self.tokenizer(self.item_emb[target])
            if phase == "id":
                parts["vq_loss"] = tok.loss
            if align:
                seq_logits = self.tokenizer.code_logits(out.encoder_latent)  # negative distances
                parts["kl_loss"] = sum(symmetric_kl(s, t) for s, t in zip(seq_logits, tok.logits))
                parts["dec_cl_loss"] = info_nce(out.decoder_semantic, tok.recon, self.config.joint.cl_temperature)
        parts["loss"] = sum(weights[k] * v for k, v in parts.items() if weights.get(k, 0) > 0)
        return parts

    def _forward(self, idx: torch.Tensor) -> tuple[RecommenderOutput, torch.Tensor]:
        """The recommender's outputs for the samples ``idx`` and their target items (N,), one row per target."""
        if self.config.joint.targets == "last":
            history, target = self.history[idx], self.target[idx]  # (B, H), (B,)
            return self.recommender(self.codes[history], history != 0, self.codes[target]), target
        windows = self.windows[idx]  # (B, W + 1)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        width = inputs.shape[1]
        scored = (inputs != 0) & (targets != 0) & (
            torch.arange(width, device=idx.device) >= width - self.counted[idx][:, None])  # (B, W)
        first = int((inputs != 0).any(0).int().argmax())  # columns padded in every row: skipped
        inputs, targets, scored = inputs[:, first:], targets[:, first:], scored[:, first:]
        out = self.recommender.forward_all(self.codes[inputs], inputs != 0, self.codes[targets])
        return RecommenderOutput(*(t[scored] for t in out)), targets[scored]

    def _normalizable(self, logits: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """With ``joint.renormalize``, the logits (N, L, K) of codes that lead to no item after the
        target's prefix are -inf: the softmax of each position runs over the trie's children only."""
        if not self.config.joint.renormalize:
            return logits
        return logits.masked_fill(~self.trie.allowed(target_codes), float("-inf"))

    def evaluate(self, split: str) -> dict[str, float]:
        """Beam-search Recall/NDCG over every user of ``split`` exactly once, reduced over processes."""
        return self.evaluate_samples(*self.data.split(split))

    @torch.no_grad()
    def evaluate_samples(self, history: np.ndarray, target: np.ndarray) -> dict[str, float]:
        """Beam-search Recall/NDCG of left-padded ``history`` [n, H] against ``target`` [n]."""
        acc = self.run.accelerator
        start, stop = shard_bounds(len(target), acc.process_index, acc.num_processes)
        items = self._recommend(history[start:stop])  # (n, top_k)
        hit = items == torch.as_tensor(target[start:stop], device=acc.device)[:, None]
        ranks = [torch.where(hit.any(1), hit.float().argmax(1) + 1, 0)]
        return ranking_metrics(gather_ranks(ranks, acc))

    def _recommend(self, history: np.ndarray) -> torch.Tensor:
        """Top-k item ids (n, top_k) of left-padded ``history`` [n, H] by beam search, -1 = none."""
        return beam_recommend(self.recommender, self.codes, self.trie, history, self.config.joint)[0]

    def recommend(self, history: np.ndarray) -> np.ndarray:
        """Top-k item ids [n, top_k] (numpy) for ``history`` [n, H]; what the probes rank."""
        return self._recommend(history).cpu().numpy()

    @torch.no_grad()
    def code_nll(self, history: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Teacher-forced cross-entropy [n, L + 1] of each code of ``target`` [n] after ``history``."""
        cfg, device = self.config.joint, self.run.accelerator.device
        self.recommender.eval()
        out = []
        for lo in range(0, len(target), cfg.eval_batch_size):
            h = torch.as_tensor(history[lo:lo + cfg.eval_batch_size], device=device)
            codes = self.codes[torch.as_tensor(target[lo:lo + cfg.eval_batch_size], device=device)]  # (B, L + 1)
            logits = self._normalizable(self.recommender(self.codes[h], h != 0, codes).logits, codes)  # (B, L + 1, K)
            out.append(F.cross_entropy(logits.transpose(1, 2), codes, reduction="none"))  # (B, L + 1)
        return torch.cat(out).cpu().numpy()

    def item_codes(self) -> np.ndarray:
        """The codes in use [n_items, L + 1] (row i = item i + 1)."""
        return self.codes[1:].cpu().numpy()

    def state(self, epoch: int, position: dict | None = None, progress: EpochProgress | None = None) -> dict:
        """Everything a resumed run needs; ``position`` says where the loop goes on (see :meth:`fit`)."""
        return {"tokenizer": self.tokenizer.state_dict(), "recommender": self.recommender.state_dict(),
                "codes": self.codes.cpu(), "epoch": epoch, "best_ndcg": self.best, "best_epoch": self.best_epoch,
                "best_valid": self.best_valid, "opt_id": self.opt_id.state_dict(),
                "opt_rec": self.opt_rec.state_dict(), "sched_id": self.sched_id.state_dict(),
                "sched_rec": self.sched_rec.state_dict(), "position": position,
                "progress": progress.state_dict() if progress else None,
                "hook_counts": [c.cpu() for c in self.hooks.counts] if progress else None}

    def load(self, state: dict) -> None:
        """The models and codes of a checkpoint (what evaluation needs)."""
        self.tokenizer.load_state_dict(state["tokenizer"])
        self.recommender.load_state_dict(state["recommender"])
        self.codes = state["codes"].to(self.run.accelerator.device)
        self.trie = CodeTrie(self.codes[1:], code_num=self.recommender.code_num).to(self.run.accelerator.device)

    def restore(self, state: dict) -> tuple[dict, EpochProgress | None]:
        """Everything of a ``last.pt`` checkpoint; returns its position and the interrupted epoch's progress."""
        self.load(state)
        for name in ("opt_id", "opt_rec", "sched_id", "sched_rec"):
            getattr(self, name).load_state_dict(state[name])
        self.best, self.best_epoch, self.best_valid = state["best_ndcg"], state["best_epoch"], state["best_valid"]
        progress = EpochProgress.from_state(state["progress"], self.run.accelerator.device)
        if state["hook_counts"] is not None:
            self.hooks.load_counts(state["hook_counts"])
        set_rng_state(state["rng"])
        return state["position"], progress

    # --- the loop -------------------------------------------------------------------------------

    def fit(self) -> dict[str, dict[str, float]]:
        """Joint epochs until ``epochs`` or early stopping, then fine-tuning from the best checkpoint.

        The loop is two segments of phases (joint, then fine-tuning); ``position`` = next global
        epoch, segment, index in it and the early-stopping count. ``last.pt`` is written after
        every epoch with the position of the next one, and on Ctrl-C with the interrupted epoch's
        progress, so ``--resume`` continues exactly where the run stopped.
        """
        cfg, run = self.config.joint, self.run
        start = time.perf_counter()
        self.best, self.best_valid, self.best_epoch = -1.0, {}, -1
        segments = [[phase_of(e, cfg.cycle, cfg.train_tokenizer) for e in range(cfg.epochs)],
                    ["finetune"] * cfg.finetune_epochs]
        with CodebookHooks(self.tokenizer, stage=self.stage, sender=self) as self.hooks:
            position, progress = {"epoch": 0, "segment": 0, "index": 0, "bad": 0}, None
            if run.resumed:
                position, progress = self.restore(run.resume_state)
                if run.lengthened:  # more epochs asked for: they all train, whatever stopped the run before
                    position = self._lengthen(position, segments)
            run.announce_start(self, start_epoch=position["epoch"])
            if not run.resumed:
                self.refresh_codes(0)
            epoch = position["epoch"]
            for segment in range(position["segment"], len(segments)):
                phases = segments[segment]
                here = segment == position["segment"]
                index, bad = (position["index"], position["bad"]) if here else (0, 0)
                if segment == 1 and index == 0 and progress is None and phases and self.best_epoch >= 0:
                    self.load(torch.load(run.checkpoint_dir / "best.pt", map_location="cpu", weights_only=False))
                while index < len(phases):
                    at = {"epoch": epoch, "segment": segment, "index": index, "bad": bad}
                    try:
                        self.train_one_epoch(epoch, phases[index], progress)
                    except TrainingInterrupted as stop:
                        run.save_checkpoint(self, self.state(epoch, at, stop.progress), "last", epoch=epoch)
                        raise
                    progress = None
                    if (epoch + 1) % cfg.eval_step == 0 or index == len(phases) - 1:
                        bad = 0 if self.validate(epoch) else bad + 1
                    index = len(phases) if bad >= cfg.patience else index + 1
                    next_at = {"epoch": epoch + 1, "segment": segment, "index": index, "bad": bad}
                    run.save_checkpoint(self, self.state(epoch, next_at), "last", epoch=epoch)
                    epoch += 1
                    run.check_stop()
        return self._test(start)

    def _lengthen(self, position: dict, segments: list[list[str]]) -> dict:
        """The position of a run resumed with a larger ``joint.epochs`` or ``joint.finetune_epochs``.

        A finished (or early-stopped) segment left its index at its old length, so exactly the added
        epochs remain; the early-stopping count starts again so that they all train.

        Raises:
            ConfigError: ``joint.epochs`` raised after fine-tuning has begun (lengthen the fine-tuning).
        """
        if position["segment"] == 1 and "joint.epochs" in self.run.lengthened and segments[1]:
            raise ConfigError("--resume: joint.epochs cannot grow once fine-tuning has begun; raise "
                              "joint.finetune_epochs to train this run longer")
        return {**position, "bad": 0}

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None = None) -> None:
        """One epoch of ``phase``; both phases share this loop and differ in what trains and the weights."""
        cfg, acc = self.config.joint, self.run.accelerator
        if cfg.shuffle_ties:
            self._samples(epoch)
        self.set_phase(phase)
        weights = self.weights(phase, epoch)
        opt, sched = (self.opt_id, self.sched_id) if phase == "id" else (self.opt_rec, self.sched_rec)
        model = self.tokenizer if phase == "id" else self.recommender
        result = train_epoch(
            sender=self, stage=self.stage, phase=phase, epoch=epoch, batches=self._batches(epoch),
            loss_fn=partial(self.losses, phase=phase, weights=weights), optimizers=[opt], schedulers=[sched],
            accelerator=acc, parameters=list(model.parameters()), max_grad_norm=cfg.max_grad_norm,
            log_every=self.config.run.log_every, global_step=epoch * self.steps_per_epoch,
            lr_fn=self.learning_rates, progress=progress, should_stop=self.run.step_stop())
        self.hooks.epoch_end(epoch)
        signals.epoch_end.send(self, stage=self.stage, phase=phase, epoch=epoch, losses=result.losses,
                               lr=self.learning_rates(), seconds=result.seconds,
                               samples_per_second=result.samples_per_second, weights=weights)
        if phase == "id":
            self.refresh_codes(epoch + 1)

    def validate(self, epoch: int) -> bool:
        """Evaluate on validation, keep the best checkpoint; True when this epoch is the new best."""
        valid = self.evaluate("valid")
        signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=valid)
        if self.prober is not None and signals.probed.receivers:
            signals.probed.send(self, stage=self.stage, split="valid", epoch=epoch, users=len(self.prober),
                                probes=self.prober.measure(self))
        improved = valid["ndcg@10"] > self.best
        if improved:
            self.best, self.best_valid, self.best_epoch = valid["ndcg@10"], valid, epoch
            self.run.save_checkpoint(self, self.state(epoch), "best", epoch=epoch, is_best=True)
        return improved

    def learning_rates(self) -> dict[str, float]:
        return {"rec": self.opt_rec.param_groups[0]["lr"], "id": self.opt_id.param_groups[0]["lr"]}

    def _test(self, start: float) -> dict[str, dict[str, float]]:
        run = self.run
        run.accelerator.wait_for_everyone()
        best_path = run.checkpoint_dir / "best.pt"
        self.load(torch.load(best_path, map_location="cpu", weights_only=False))
        run.write_item_codes(self.item_codes(), self.data.item_map)  # the best checkpoint's codes, by raw item id
        test = self.evaluate("test")
        signals.evaluated.send(self, stage=self.stage, split="test", epoch=self.best_epoch, metrics=test)
        run.write_metrics({"valid": self.best_valid, "test": test, "best_epoch": self.best_epoch,
                           "best_checkpoint": str(best_path)})
        signals.run_finished.send(self, stage=self.stage, status="completed", best_metrics=self.best_valid,
                                  best_checkpoint=str(best_path), seconds=time.perf_counter() - start)
        return {"valid": self.best_valid, "test": test}


def run_joint(config: Config, *, output_dir=None, wandb_mode=None, log_with=("wandb",), subscribers=(),
              accelerator=None, resume: bool = False, rebuild: bool = False):
    """The whole pipeline: embeddings and tokenizer (cached; ``rebuild`` trains them again), then joint
    training in its run directory."""
    prepare_process(config)
    data = load_stage_data(config)
    run = Run(config, stage="joint", output_dir=output_dir, wandb_mode=wandb_mode, wandb_project=JOINT_PROJECT,
              wandb_run_name=config.run.name, log_with=log_with, subscribers=subscribers, accelerator=accelerator,
              resume=resume)
    embeddings, _ = ensure_embeddings(config, data, run.accelerator, rebuild=rebuild)
    tokenizer_state, _ = ensure_tokenizer(config, embeddings, run.accelerator, data, rebuild=rebuild)
    set_seed(config.run.seed)
    with run:
        result = JointTrainer(config, run, data, embeddings, tokenizer_state).fit()
    if run.is_main:
        print_summary(result, run.run_dir)
    return result


def print_summary(result: dict, run_dir) -> None:
    names = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    print("\n" + " " * 8 + "".join(f"{n:>11}" for n in names))
    for split in ("valid", "test"):
        print(f"{split:<8}" + "".join(f"{result[split].get(n, float('nan')):>11.4f}" for n in names))
    print(f"\nrun directory: {run_dir}")


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m etegrec.training.joint", __doc__, run_joint, argv)


if __name__ == "__main__":
    sys.exit(main())
