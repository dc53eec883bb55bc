"""Evaluation shared by the stages (docs/protocol.md): full ranking (SASRec) and beam search
(the generative recommender).

Every user of a split is scored exactly once, whatever the number of processes: rows are split
into contiguous shards without padding, and ranks are gathered back in order.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from etegrec.metrics import ranking_metrics
from etegrec.models import CodeTrie, T5Recommender, beam_search

__all__ = ["BeamEvaluation", "beam_recommend", "check_same_on_every_rank", "evaluate_full_ranking", "gather_ranks",
           "rank_of_targets", "shard_bounds", "validation_subsample"]


def rank_of_targets(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items; ties are counted against the target.

    ``scores`` (batch, n_items + 1) with column 0 (padding) at -inf; ``targets`` (batch,).
    """
    target_scores = scores.gather(1, targets[:, None])  # (batch, 1)
    return (scores >= target_scores).sum(dim=1)  # the target itself counts once: rank >= 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, non-overlapping ``[start, stop)`` of ``n`` rows for process ``rank``."""
    per = -(-n // world_size)
    return min(rank * per, n), min((rank + 1) * per, n)


@torch.no_grad()
def evaluate_full_ranking(score_fn: Callable[[torch.Tensor], torch.Tensor], history: np.ndarray,
                          target: np.ndarray, *, batch_size: int = 512, accelerator=None) -> dict[str, float]:
    """Recall@{1,5,10} and NDCG@{5,10} of ``score_fn(history_batch) -> (batch, n_items + 1)``."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else torch.device("cpu")
    start, stop = shard_bounds(len(target), rank, world)
    ranks = []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        h = torch.as_tensor(history[lo:hi], device=device)
        t = torch.as_tensor(target[lo:hi], device=device)
        ranks.append(rank_of_targets(score_fn(h), t))
    return ranking_metrics(gather_ranks(ranks, accelerator))


def gather_ranks(ranks: list[torch.Tensor], accelerator=None) -> np.ndarray:
    """Concatenate this process's rank batches and gather every process's shard, in rank order."""
    local = torch.cat(ranks).cpu().numpy() if ranks else np.zeros(0, dtype=np.int64)
    if accelerator is None or accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object
    return np.concatenate(gather_object([local]))


def items_of(recommender: T5Recommender, items: torch.Tensor) -> torch.Tensor | None:
    """``items`` (the history's item ids) if ``recommender`` reads them, else None."""
    return items if recommender.item_embedding is not None else None


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
        out = beam_search(recommender, codes[h], h != 0, trie, history_items=items_of(recommender, h), beam_size=cfg.beam_size, top_k=cfg.top_k,
                          constrained=cfg.constrained, renormalize=cfg.renormalize and cfg.constrained)
        items.append(out.items)
        scores.append(out.scores)
    if not items:
        empty = torch.empty(0, cfg.top_k, device=codes.device)
        return empty.long(), empty
    return torch.cat(items), torch.cat(scores)


def validation_subsample(history: np.ndarray, target: np.ndarray, users: int) -> tuple[np.ndarray, np.ndarray]:
    """``users`` rows of ``history`` [n, H] / ``target`` [n] drawn with a fixed seed, in their order;
    all of them when ``users`` is 0 or not below n. The draw depends on n alone, so every run and
    seed on a dataset selects its model on the same users (beam search over 22k Amazon users is the
    slowest part of an epoch; model selection needs far fewer)."""
    if not users or users >= len(target):
        return history, target
    pick = np.sort(np.random.default_rng(0x5E1EC7).choice(len(target), size=users, replace=False))
    return history[pick], target[pick]


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


class BeamEvaluation:
    """Evaluation and the probes' view of a trainer holding ``recommender``, ``codes`` (n_items + 1,
    L + 1), ``trie``, ``config``, ``run`` and ``data`` (the joint trainer)."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Beam-search Recall/NDCG over the users of ``split`` (each exactly once, reduced over
        processes): every test user; the validation users of ``joint.valid_users`` when set."""
        history, target = self.data.split(split)
        if split == "valid":
            history, target = validation_subsample(history, target, self.config.joint.valid_users)
        return self.evaluate_samples(history, target)

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
            out_h = self.recommender(self.codes[h], h != 0, codes, items_of(self.recommender, h))
            logits = self._normalizable(out_h.logits, codes)  # (B, L + 1, K)
            out.append(F.cross_entropy(logits.transpose(1, 2), codes, reduction="none"))  # (B, L + 1)
        return torch.cat(out).cpu().numpy()
