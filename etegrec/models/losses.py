"""Losses of the generative recommender and of its alignment with the tokenizer."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["catalogue_nce", "code_loss", "info_nce", "symmetric_kl", "usage_deficit"]


def code_loss(logits: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, L, K) for ``target_codes`` (B, L), batch and positions."""
    if logits.dim() != 3 or target_codes.shape != logits.shape[:2]:
        raise ValueError(
            f"code_loss needs logits (batch, code_length, code_num) and target_codes (batch, "
            f"code_length), got {tuple(logits.shape)!r} and {tuple(target_codes.shape)!r}; "
            "pass the logits of T5Recommender.forward and the codes it was given."
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_codes.reshape(-1))


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


def catalogue_nce(a: torch.Tensor, items: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of rows ``a`` (batch, d) against every item: ``items`` (n_items, d) holds one row per item and
    ``target`` (batch,) the row each ``a`` should pick (cosine similarity over ``temperature``). Unlike
    :func:`info_nce`, a target that occurs twice in a batch is never its own negative."""
    if items.dim() != 2 or a.shape[-1] != items.shape[-1] or target.shape != a.shape[:1]:
        raise ValueError(f"catalogue_nce needs a (batch, d), items (n_items, d) and target (batch,), got "
                         f"{tuple(a.shape)!r}, {tuple(items.shape)!r} and {tuple(target.shape)!r}")
    logits = F.normalize(a, dim=-1) @ F.normalize(items, dim=-1).T / temperature  # (batch, n_items)
    return F.cross_entropy(logits, target)


def usage_deficit(logits: list[torch.Tensor]) -> torch.Tensor:
    """How far a batch's soft code usage is from uniform, summed over levels: for each level's logits
    (batch, K), ``log K`` minus the entropy of the batch's mean code distribution (0 when the batch
    spreads evenly over the K codes, ``log K`` when it all falls on one)."""
    deficit = logits[0].new_zeros(())
    for level in logits:
        usage = level.softmax(-1).mean(0)
        deficit = deficit + math.log(level.shape[-1]) + (usage * usage.clamp_min(1e-12).log()).sum()
    return deficit
