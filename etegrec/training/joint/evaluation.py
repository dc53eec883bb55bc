"""The joint stage's evaluation (docs/protocol.md): constrained beam search over the item codes,
every user of a split scored once across processes (:mod:`etegrec.training.run.evaluation`)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from etegrec.config import EvaluationConfig
from etegrec.metrics import ranking_metrics
from etegrec.models import CodeTrie, T5Recommender, beam_search

from ..run.evaluation import gather_ranks, shard_bounds

__all__ = ["BeamEvaluation", "beam_recommend", "items_of", "validation_subsample"]


def items_of(recommender: T5Recommender, items: torch.Tensor) -> torch.Tensor | None:
    """``items`` (the history's item ids) if ``recommender`` reads them, else None."""
    return items if recommender.item_embedding is not None else None


@torch.no_grad()
def beam_recommend(recommender: T5Recommender, codes: torch.Tensor, trie: CodeTrie, history: np.ndarray,
                   cfg: EvaluationConfig, *, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k item ids and scores, (n, top_k) each, of left-padded ``history`` [n, H] by the beam search
    of evaluation (``cfg``: the config's evaluation section; ``renormalize``: recommender.renormalize,
    which applies to a constrained search only); -1 / -inf where fewer items were reached. ``codes`` is
    (n_items + 1, L + 1) with row 0 padding."""
    if recommender.item_output is not None and recommender.output_trie is not trie:
        raise ValueError("the recommender's item output reads other codes than the trie of this search; "
                         "call recommender.use_trie(trie) with the trie of the codes in use")
    recommender.eval()
    items, scores = [], []
    for lo in range(0, len(history), cfg.batch_size):
        h = torch.as_tensor(history[lo:lo + cfg.batch_size], device=codes.device)
        out = beam_search(recommender, codes[h], h != 0, trie, history_items=items_of(recommender, h),
                          beam_size=cfg.beam_size, top_k=cfg.top_k, constrained=cfg.constrained,
                          renormalize=renormalize and cfg.constrained)
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


class BeamEvaluation:
    """Evaluation and the probes' view of a trainer holding ``recommender``, ``codes`` (n_items + 1,
    L + 1), ``trie``, ``config``, ``run`` and ``data`` (the joint trainer)."""

    def evaluate(self, split: str) -> dict[str, float]:
        """Beam-search Recall/NDCG over the users of ``split`` (each exactly once, reduced over
        processes): every test user; the validation users of ``evaluation.valid_users`` when set."""
        history, target = self.data.split(split)
        if split == "valid":
            history, target = validation_subsample(history, target, self.config.evaluation.valid_users)
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
        return beam_recommend(self.recommender, self.codes, self.trie, history, self.config.evaluation,
                              renormalize=self.config.recommender.renormalize)[0]

    def recommend(self, history: np.ndarray) -> np.ndarray:
        """Top-k item ids [n, top_k] (numpy) for ``history`` [n, H]; what the probes rank."""
        return self._recommend(history).cpu().numpy()

    @torch.no_grad()
    def code_nll(self, history: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Teacher-forced cross-entropy [n, L + 1] of each code of ``target`` [n] after ``history``."""
        size, device = self.config.evaluation.batch_size, self.run.accelerator.device
        self.recommender.eval()
        out = []
        for lo in range(0, len(target), size):
            h = torch.as_tensor(history[lo:lo + size], device=device)
            codes = self.codes[torch.as_tensor(target[lo:lo + size], device=device)]  # (B, L + 1)
            out_h = self.recommender(self.codes[h], h != 0, codes, items_of(self.recommender, h))
            logits = self._normalizable(out_h.logits, codes)  # (B, L + 1, K)
            out.append(F.cross_entropy(logits.transpose(1, 2), codes, reduction="none"))  # (B, L + 1)
        return torch.cat(out).cpu().numpy()
