"""Evaluation every stage shares (docs/protocol.md): full ranking, and the sharding that scores
every user of a split exactly once, whatever the number of processes: rows are split into contiguous
shards without padding, and ranks are gathered back in order."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from etegrec.metrics import ranking_metrics

__all__ = ["check_same_on_every_rank", "evaluate_full_ranking", "gather_ranks", "rank_of_targets", "shard_bounds"]


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
