"""ETEGRec's alternating optimisation (the joint stage's trainer).

The tokenizer (RQ-VAE) and a T5 generative recommender are trained in cycles of ``cycle`` epochs:
the first epoch of a cycle trains the tokenizer with the recommender frozen (phase ``id``; with
``joint.id_trains_rec`` the recommender trains in it too), the others train the recommender with the
tokenizer frozen (phase ``rec``); both phases share one loop and differ in what trains and the loss
weights (``losses``). Item codes come from ``etegrec.forge.get_code`` (with FORGE) at the start and
after every tokenizer epoch; with ``codes.margin`` an item keeps its code unless the nearest is clearly
closer. Validation by beam search, early stopping on NDCG@10, optional fine-tuning of the
recommender alone on fixed codes (from the best checkpoint), and a final test with the best checkpoint.

With ``joint.second_pass`` the alternating epochs only choose the codes: a fresh recommender then trains on
the codes of their best checkpoint, fixed, for ``joint.epochs`` epochs (phase ``second``) and the fine-tuning,
and validation, the best checkpoint and the test are its own.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from etegrec import signals
from etegrec.config import Config, ConfigError
from etegrec.data import SequenceData
from etegrec.forge import get_code
from etegrec.hooks.codebook import CodebookHooks
from etegrec.models import CodeTrie, RecommenderOutput, code_loss, usage_deficit, window_targets

from ..rqvae.tokenizer import attribute_block, build_tokenizer, tokenizer_inputs
from ..run import EarlyStopping, EpochProgress, LoopPosition, Run, StageTrainer, shuffled_batches, train_epoch
from ..run.evaluation import check_same_on_every_rank
from ..run.item_codes import codes_for_items
from .alignment import Alignment
from .averaging import WeightAverage
from .evaluation import BeamEvaluation, items_of
from .probing import Prober
from .recommender import build_recommender

__all__ = ["JointTrainer", "REPEAT_BIAS_LR", "file_codes", "phase_of"]

REPEAT_BIAS_LR = 0.05  # as the SASRec stage's (etegrec.training.embed.REPEAT_BIAS_LR)

ALIGNMENT_LOSSES = ("kl_loss", "dec_cl_loss")
DELAYED_LOSSES = (*ALIGNMENT_LOSSES, "usage_loss")  # off before losses.align_from_epoch; usage_loss guards the KL


def phase_of(epoch: int, cycle: int, train_tokenizer: bool = True, until: int | None = None) -> str:
    """``id`` for the first epoch of every cycle of ``cycle`` epochs, ``rec`` for the others (every
    epoch when the tokenizer is not trained, and from epoch ``until`` on when that is set)."""
    trains = train_tokenizer and (until is None or epoch < until)
    return "id" if trains and epoch % cycle == 0 else "rec"


def file_codes(config: Config, data: SequenceData) -> torch.Tensor | None:
    """The codes ``codes.file`` gives (n_items + 1, L + 1; row 0 padding), None without it.

    Raises:
        ConfigError: the file cannot give every item of ``data`` codes of its own (:func:`codes_for_items`)."""
    if config.codes.file is None:
        return None
    tok = config.tokenizer
    codes = codes_for_items(config.codes.file, data.item_map, code_num=tok.codebook_size, width=tok.num_layers + 1)
    return torch.as_tensor(np.concatenate([np.zeros((1, codes.shape[1]), dtype=np.int64), codes]))


class JointTrainer(BeamEvaluation, StageTrainer):
    """ETEGRec's alternating optimisation; talks only through the signals."""

    def __init__(self, config: Config, run: Run, data: SequenceData, embeddings: np.ndarray,
                 tokenizer_state: dict) -> None:
        self.config, self.run, self.data = config, run, data
        acc, cfg = run.accelerator, config.joint
        device = acc.device
        inputs = tokenizer_inputs(config.tokenizer, embeddings, attribute_block(config, data))
        self.item_emb = torch.as_tensor(inputs, device=device)  # (n_items + 1, d)
        if config.codes.shuffled:  # the control of codes.shuffled: item i's codes are those of another item's embedding
            order = np.random.default_rng([config.run.seed, 0x5EED]).permutation(data.n_items) + 1
            self.item_emb[1:] = self.item_emb[torch.as_tensor(order, device=device)]
        self.tokenizer = build_tokenizer(config.tokenizer, self.item_emb.shape[1]).to(device)
        self.tokenizer.load_state_dict(tokenizer_state)
        self.embeddings = embeddings  # the SASRec stage's: a second pass's fresh recommender starts from them too
        self.recommender = self._new_recommender()
        # with joint.ema_decay: validation, the best checkpoint and the test score the averaged weights
        self.average = WeightAverage(self.recommender, cfg.ema_decay) if cfg.ema_decay else None
        self._samples(epoch=0)
        self.opt_id = torch.optim.AdamW(self.tokenizer.parameters(), lr=cfg.lr_id, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self._batches(0))
        id_epochs = sum(phase == "id" for phase in self.segments()[0])
        self.sched_id = self._schedule(self.opt_id, id_epochs)
        # the schedule of a run without the second pass (its fine-tuning included), so that the alternating
        # epochs, and the codes they choose, are the same with and without it
        self._rec_optimiser(cfg.epochs - (0 if cfg.id_trains_rec else id_epochs) + cfg.finetune_epochs)
        self.second_pass_started = False
        self.codes: torch.Tensor | None = None  # (n_items + 1, L + 1), row 0 = padding
        self.trie: CodeTrie | None = None
        self.codes_changed = 1.0  # share of items whose code changed at the last refresh
        evaluation = config.evaluation
        self.prober = Prober(data, users=evaluation.probe_users, seed=config.run.seed) if evaluation.probe_users else None
        self.eval_every = evaluation.every_epochs
        self.stopping = self._new_stopping()
        self.hooks = CodebookHooks(self.tokenizer, stage=self.stage, sender=self)
        self.alignment = Alignment(config, self.tokenizer, self.item_emb, self.hooks)

    # --- pieces of the loop -------------------------------------------------------------------

    def _new_recommender(self):
        """A recommender with freshly initialised weights (its item vectors from the SASRec stage's embeddings)."""
        return build_recommender(self.config, self.tokenizer, semantic_dim=self.item_emb.shape[1],
                                 num_items=self.data.n_items, embeddings=self.embeddings
                                 ).to(self.run.accelerator.device)

    def _new_stopping(self) -> EarlyStopping:
        return EarlyStopping("ndcg@10", mode="max", patience=self.config.evaluation.patience)

    def _second_pass_epochs(self) -> int:
        """The epochs the second pass's learning-rate schedule spans: its own and the fine-tuning."""
        return self.config.joint.epochs + self.config.joint.finetune_epochs

    def _rec_optimiser(self, epochs: int) -> None:
        """A new optimiser for the recommender, its learning rate warmed up then decayed over ``epochs``."""
        cfg = self.config.joint
        self.opt_rec = torch.optim.AdamW(self._rec_param_groups(), lr=cfg.lr_rec, weight_decay=cfg.weight_decay)
        self.sched_rec = self._schedule(self.opt_rec, epochs)

    def start_second_pass(self) -> None:
        """``joint.second_pass``: keep the codes of the alternating epochs' best checkpoint and start the
        recommender afresh on them (new weights, optimiser, schedule, weight average and model selection)."""
        self.load_state_dict(self.run.files.load_best())  # its codes (and tokenizer) are the ones kept
        with torch.random.fork_rng(devices=[]):  # drawn from the run's seed: the same weights on every rank and
            torch.manual_seed(self.config.run.seed)  # after a resume, and training's own random stream goes on as it was
            self.recommender.load_state_dict(self._new_recommender().state_dict())  # the trie in use stays
        self._rec_optimiser(self._second_pass_epochs())
        if self.average is not None:
            self.average.restart()
        self.stopping = self._new_stopping()
        self.second_pass_started, self.codes_changed = True, 0.0

    def _rec_param_groups(self) -> list[dict]:
        """The recommender's parameters; its repeat bias (one number per code position, in logit units)
        in a group of its own at :data:`REPEAT_BIAS_LR` without weight decay: Adam moves a parameter by
        about its learning rate per step, and at the recommender's rate the bias would need thousands of
        steps to reach the large negative value ml-100k asks for (the SASRec stage's finding). With
        ``joint.lr_item_embedding`` set, the history item vectors get a group at that rate (a lever against
        the overfitting they bring on Beauty; freezing them did not help: docs/results.md)."""
        bias = self.recommender.repeat_logit
        item_rate = self.config.joint.lr_item_embedding  # the config rules: set only with item vectors
        vectors = self.recommender.item_embedding.weight if item_rate is not None else None
        own = {id(p) for p in (bias, vectors) if p is not None}
        groups = [{"params": [p for p in self.recommender.parameters() if id(p) not in own]}]
        if bias is not None:
            groups.append({"params": [bias], "lr": REPEAT_BIAS_LR, "weight_decay": 0.0})
        if vectors is not None:
            groups.append({"params": [vectors], "lr": item_rate})
        return groups

    def _samples(self, epoch: int) -> None:
        """The training samples of ``epoch``: with ``joint.shuffle_ties``, same-timestamp items are
        reordered at random (seeded by the run's seed and the epoch) before the prefixes are cut."""
        rng = np.random.default_rng([self.config.run.seed, epoch]) if self.config.joint.shuffle_ties else None
        device = self.run.accelerator.device
        if self.config.joint.targets == "all":  # windows: a target after every item (as the SASRec stage)
            length = self.data.max_his_len
            windows, counted = self.data.train_windows(length + 1, self.config.joint.window_stride or length, rng)
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
        warmup = min(total // 2, round(self.config.joint.lr_warmup_epochs * self.steps_per_epoch))
        return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=total)

    def _batches(self, epoch: int) -> list[np.ndarray]:
        cfg, acc = self.config.joint, self.run.accelerator
        batches = shuffled_batches(self.n_samples, cfg.batch_size, seed=self.config.run.seed, epoch=epoch,
                                   rank=acc.process_index, world_size=acc.num_processes)
        keep = math.ceil(len(batches) * cfg.sample_fraction)  # a fresh random share of samples each epoch
        return batches[:keep]

    def weights(self, phase: str, epoch: int) -> dict[str, float]:
        """Each loss part's weight in ``phase`` (id, rec, second, finetune) at ``epoch``; the alignment losses are
        off before ``losses.align_from_epoch``, and so is the tokenizer's code-usage deficit."""
        cfg = self.config.losses
        if phase == "id":
            weights = {"vq_loss": cfg.id_vq_weight, "code_loss": cfg.id_code_weight, "kl_loss": cfg.id_kl_weight,
                       "dec_cl_loss": cfg.id_dec_cl_weight}
            if cfg.id_usage_weight:
                weights["usage_loss"] = cfg.id_usage_weight
        elif phase == "rec":
            weights = {"code_loss": cfg.rec_code_weight, "kl_loss": cfg.rec_kl_weight,
                       "dec_cl_loss": cfg.rec_dec_cl_weight}
        else:  # fine-tuning and the second pass: the recommender alone, on fixed codes
            weights = {"code_loss": cfg.rec_code_weight}
        if cfg.rec_item_weight and self.trains_rec(phase):
            weights["item_loss"] = cfg.rec_item_weight
        if epoch < cfg.align_from_epoch:
            weights.update({k: 0.0 for k in DELAYED_LOSSES if k in weights})
        return weights

    def _autocast(self):
        """bfloat16 autocast for the recommender's training forward when ``joint.mixed_precision`` is bf16
        (weights, optimiser and losses stay fp32; evaluation always runs in fp32)."""
        return torch.autocast(self.run.accelerator.device.type, dtype=torch.bfloat16,
                              enabled=self.config.joint.mixed_precision == "bf16")

    def trains_rec(self, phase: str) -> bool:
        """Whether the recommender trains in ``phase`` (in tokenizer epochs only with ``joint.id_trains_rec``)."""
        return phase != "id" or self.config.joint.id_trains_rec

    def set_phase(self, phase: str) -> None:
        """Only the models of ``phase`` train; a frozen one is in eval mode."""
        train_tokenizer, train_rec = phase == "id", self.trains_rec(phase)
        self.tokenizer.requires_grad_(train_tokenizer).train(train_tokenizer)
        self.recommender.requires_grad_(train_rec).train(train_rec)

    def refresh_codes(self, epoch: int) -> None:
        """Recompute the item codes (FORGE) for use from ``epoch`` on, and the prefix trie."""
        cfg = self.config.codes
        with self.hooks.pause():
            result = get_code(self.tokenizer, self.item_emb, epoch=epoch, use_forge=cfg.use_forge,
                              policy=cfg.forge_policy, previous=self.codes, margin=cfg.margin, sender=self,
                              stage=self.stage)
        first = self.codes is None  # the start's assignment changes nothing that was learned
        self.codes = result.codes.to(self.run.accelerator.device)
        self.codes_changed = 0.0 if first else result.assignment.changed / max(1, len(result.assignment.codes))
        check_same_on_every_rank(self.codes, self.run.accelerator, what=f"item codes for epoch {epoch}")
        self._use_codes()

    def _use_codes(self) -> None:
        """The prefix trie of :attr:`codes`, for the loss, the beam search and the recommender's item output."""
        self.trie = CodeTrie(self.codes[1:], code_num=self.recommender.code_num).to(self.run.accelerator.device)
        self.recommender.use_trie(self.trie)

    def losses(self, index: np.ndarray, *, phase: str, weights: dict[str, float], epoch: int = 0
               ) -> dict[str, torch.Tensor]:
        """Loss parts of one batch (samples ``index`` of ``epoch``) and their weighted sum ``loss``; both phases
        use this."""
        idx = torch.as_tensor(index, device=self.codes.device)
        with torch.set_grad_enabled(self.trains_rec(phase)), self._autocast():  # a frozen recommender needs no graph
            out, target = self._forward(idx)  # one row per scored target
        out = RecommenderOutput(*(None if t is None else t.float() for t in out))  # fp32 losses under bf16 too
        target_codes = self.codes[target]  # (N, L + 1)
        parts = {"code_loss": code_loss(self._normalizable(out.logits, target_codes), target_codes)}
        if weights.get("item_loss", 0) > 0:  # column i of the item scores is item i + 1
            parts["item_loss"] = F.cross_entropy(out.item_logits, target - 1)
        align = any(weights.get(k, 0) > 0 for k in ALIGNMENT_LOSSES)
        if phase == "id" or align:
            with torch.set_grad_enabled(phase == "id"):  # the frozen tokenizer only gives targets
                tok = self.tokenizer(self.item_emb[target])
            if phase == "id":
                parts["vq_loss"] = tok.loss if self.config.losses.id_vq_items == "targets" else \
                    self._catalogue_vq_loss(index, epoch, len(target))
            if align:
                parts.update(self.alignment.losses(out, tok, target, train_tokenizer=phase == "id"))
            if weights.get("usage_loss", 0) > 0:
                parts["usage_loss"] = usage_deficit(tok.logits)
        parts["loss"] = sum(weights[k] * v for k, v in parts.items() if weights.get(k, 0) > 0)
        return parts

    def _catalogue_vq_loss(self, index: np.ndarray, epoch: int, n: int) -> torch.Tensor:
        """The tokenizer's RQ-VAE loss on ``n`` distinct items drawn uniformly from the catalogue, the diet of its
        pretraining (``losses.id_vq_items=catalogue``); on the batch's targets instead, each item counts as often as
        it is a target and the codebook moves its resolution toward the popular items. The draw is seeded by the
        run's seed, the epoch and the batch's first sample, so a resumed run draws the same items. The codebook
        hooks do not count this forward: the epoch's code usage stays that of the targets, in both settings."""
        n_items = self.item_emb.shape[0] - 1
        rng = np.random.default_rng([self.config.run.seed, epoch, int(index[0])])
        items = torch.as_tensor(rng.choice(n_items, size=min(n, n_items), replace=False) + 1,
                                device=self.item_emb.device)
        with self.hooks.pause():
            return self.tokenizer(self.item_emb[items]).loss

    def _forward(self, idx: torch.Tensor) -> tuple[RecommenderOutput, torch.Tensor]:
        """The recommender's outputs for the samples ``idx`` and their target items (N,), one row per target."""
        if self.config.joint.targets == "last":
            history, target = self.history[idx], self.target[idx]  # (B, H), (B,)
            out = self.recommender(self.codes[history], history != 0, self.codes[target],
                                   items_of(self.recommender, history))
            return out, target
        inputs, targets, scored = window_targets(self.windows[idx], self.counted[idx])  # (B, W) each
        out = self.recommender.forward_all(self.codes[inputs], inputs != 0, self.codes[targets], scored,
                                           items_of(self.recommender, inputs))
        return out, targets[scored]

    def _normalizable(self, logits: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
        """With ``recommender.renormalize``, the logits (N, L, K) of codes that lead to no item after the
        target's prefix are -inf: the softmax of each position runs over the trie's children only."""
        if not self.config.recommender.renormalize:
            return logits
        return logits.masked_fill(~self.trie.allowed(target_codes), float("-inf"))

    def item_codes(self) -> np.ndarray:
        """The codes in use [n_items, L + 1] (row i = item i + 1)."""
        return self.codes[1:].cpu().numpy()

    # --- what fit_stage asks for ----------------------------------------------------------------

    def segments(self) -> list[list[str]]:
        """The alternating epochs, (with ``joint.second_pass``: the second pass's,) then the fine-tuning epochs."""
        cfg = self.config.joint
        alternating = [phase_of(e, cfg.cycle, cfg.train_tokenizer, cfg.id_until_epoch) for e in range(cfg.epochs)]
        second = [["second"] * cfg.epochs] if cfg.second_pass else []
        return [alternating, *second, ["finetune"] * cfg.finetune_epochs]

    def begin(self, resumed: bool) -> None:
        if resumed:
            return
        codes = file_codes(self.config, self.data)  # codes.file: fixed, never refreshed (train_tokenizer is off)
        if codes is None:
            self.refresh_codes(0)
            return
        self.codes, self.codes_changed = codes.to(self.run.accelerator.device), 0.0
        self._use_codes()

    def start_segment(self, segment: int) -> None:
        if segment == 1 and self.config.joint.second_pass:
            self.start_second_pass()
        elif segment >= 1 and self.stopping.best_epoch >= 0:  # fine-tuning starts from the best checkpoint
            self.load_state_dict(self.run.files.load_best())

    def check_lengthened(self, position: LoopPosition) -> None:
        """Raises: ConfigError: ``joint.epochs`` raised after the alternating epochs have ended, where it would
        lengthen epochs already trained (lengthen the fine-tuning instead)."""
        cfg = self.config.joint
        if position.segment >= 1 and "joint.epochs" in self.run.lengthened and (cfg.finetune_epochs or cfg.second_pass):
            later = "the second pass" if cfg.second_pass else "fine-tuning"
            raise ConfigError(f"--resume: joint.epochs cannot grow once {later} has begun; raise "
                              "joint.finetune_epochs to train this run longer")

    def train_one_epoch(self, epoch: int, phase: str, progress: EpochProgress | None = None) -> None:
        """One epoch of ``phase``; both phases share this loop and differ in what trains and the weights."""
        cfg, acc = self.config.joint, self.run.accelerator
        if cfg.shuffle_ties:
            self._samples(epoch)
        self.set_phase(phase)
        weights = self.weights(phase, epoch)
        trained = ([(self.tokenizer, self.opt_id, self.sched_id)] if phase == "id" else []) + (
            [(self.recommender, self.opt_rec, self.sched_rec)] if self.trains_rec(phase) else [])
        result = train_epoch(
            sender=self, stage=self.stage, phase=phase, epoch=epoch, batches=self._batches(epoch),
            loss_fn=partial(self.losses, phase=phase, weights=weights, epoch=epoch),
            optimizers=[t[1] for t in trained],
            schedulers=[t[2] for t in trained], accelerator=acc,
            parameters=[list(t[0].parameters()) for t in trained], max_grad_norm=cfg.max_grad_norm,
            log_every=self.config.run.log_every, global_step=epoch * self.steps_per_epoch,
            lr_fn=self.learning_rates, progress=progress, should_stop=self.run.step_stop(),
            after_step=self.average.update if self.average is not None and self.trains_rec(phase) else None)
        self.hooks.epoch_end(epoch)
        signals.epoch_end.send(self, stage=self.stage, phase=phase, epoch=epoch, losses=result.losses,
                               lr=self.learning_rates(), seconds=result.seconds,
                               samples_per_second=result.samples_per_second, weights=weights)
        if phase == "id":
            self.alignment.forget()
            self.refresh_codes(epoch + 1)

    def validate(self, epoch: int) -> dict[str, float]:
        with self.average.applied() if self.average is not None else nullcontext():
            valid = self.evaluate("valid")
            signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=valid)
            if self.prober is not None and signals.probed.receivers:
                signals.probed.send(self, stage=self.stage, split="valid", epoch=epoch, users=len(self.prober),
                                    probes=self.prober.measure(self))
        return valid

    def learning_rates(self) -> dict[str, float]:
        return {"rec": self.opt_rec.param_groups[0]["lr"], "id": self.opt_id.param_groups[0]["lr"]}


    def state_dict(self) -> dict:
        """Everything a resume needs. ``recommender`` holds the weights that are scored (with
        ``joint.ema_decay`` the average, the live ones then under ``recommender_live``)."""
        state = {"tokenizer": self.tokenizer.state_dict(), "recommender": self.recommender.state_dict(),
                 "codes": self.codes.cpu(), "codes_changed": self.codes_changed, "opt_id": self.opt_id.state_dict(),
                 "opt_rec": self.opt_rec.state_dict(), "sched_id": self.sched_id.state_dict(),
                 "sched_rec": self.sched_rec.state_dict(), "second_pass": self.second_pass_started}
        if self.average is not None:
            state["recommender_live"], state["recommender"] = state["recommender"], self.average.averaged_state_dict()
        return state

    def load_state_dict(self, state: dict, *, resume: bool = False) -> None:
        """The models and codes of a checkpoint (what evaluation needs); ``resume``: the optimisers too, and
        with ``joint.ema_decay`` the live weights and their average (otherwise the average restarts from the
        loaded, averaged weights: fine-tuning goes on from them)."""
        self.tokenizer.load_state_dict(state["tokenizer"])
        self.alignment.forget()
        live = resume and self.average is not None and "recommender_live" in state
        self.recommender.load_state_dict(state["recommender_live"] if live else state["recommender"])
        if live:
            self.average.load_average(state["recommender"])
        elif self.average is not None:
            self.average.restart()
        self.codes = state["codes"].to(self.run.accelerator.device)
        self._use_codes()
        if resume:
            if state.get("second_pass") and not self.second_pass_started:  # its optimiser, with its schedule
                self._rec_optimiser(self._second_pass_epochs())
                self.second_pass_started = True
            for name in ("opt_id", "opt_rec", "sched_id", "sched_rec"):
                getattr(self, name).load_state_dict(state[name])
            # what the probes report until the next refresh; unknown in checkpoints written before it was kept
            self.codes_changed = state.get("codes_changed", float("nan"))

    def finish(self, best: dict) -> dict:
        self.run.write_item_codes(self.item_codes(), self.data.item_map)  # the best checkpoint's codes, by raw id
        test = self.evaluate("test")
        signals.evaluated.send(self, stage=self.stage, split="test", epoch=self.stopping.best_epoch, metrics=test)
        return {"valid": self.stopping.best_metrics, "test": test, "best_epoch": self.stopping.best_epoch,
                "best_checkpoint": str(self.run.checkpoint_dir / "best.pt")}
