"""``get_code``: run the tokenizer over every item, assign the final codes, announce them."""
from __future__ import annotations

import operator
import time
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from etegrec import signals
from etegrec.forge.assign import POLICIES, CodeAssignment, assign_codes

__all__ = ["ItemCodes", "get_code"]


class ItemCodes(NamedTuple):
    """What ``get_code`` returns: the code table to train on and the assignment behind it."""

    codes: torch.Tensor  # (n_items + 1, L + 1) int64; row 0 is all-zero padding, row i is item i
    assignment: CodeAssignment  # its .codes is the same table without the padding row, in numpy


def get_code(
    tokenizer: nn.Module,
    item_embeddings: torch.Tensor,
    *,
    epoch: int,
    use_forge: bool = True,
    policy: str = "round_robin",
    code_num: int | None = None,
    previous: Any = None,
    margin: float = 0.0,
    batch_size: int = 4096,
    sender: Any = None,
    stage: str = "joint",
    device: torch.device | str | None = None,
) -> ItemCodes:
    """Compute every item's code with the tokenizer, apply FORGE and emit ``codes_assigned``.

    The tokenizer runs in eval mode under ``torch.no_grad()`` on its own device, in batches of
    ``batch_size`` items; the train/eval mode of each of its modules is restored afterwards. It is
    called as ``tokenizer(x)`` and must return an object with ``.codes`` (LongTensor [B, L]) and
    ``.logits`` (L tensors [B, K], the negative squared distances to each layer's codes); ``K`` is
    ``tokenizer.codebook_size``, the default ``code_num``.

    Args:
        tokenizer: the RQ-VAE (or anything with the interface above).
        item_embeddings: ``[n_items + 1, d]`` float tensor; row 0 is padding and is skipped.
        epoch: the epoch reported in the ``codes_assigned`` payload.
        use_forge, policy: see :func:`etegrec.forge.assign_codes`; ``"nearest_free"`` uses the
            last layer's distances (``-logits[-1]``), kept on the CPU as float32 for all items.
        code_num: codebook size; ``tokenizer.codebook_size`` when None.
        previous: the codes of the previous call, to count ``changed``: the ``ItemCodes`` it
            returned, its ``codes`` tensor (``[n_items + 1, L+1]``, padding row 0 included), or a
            numpy array ``[n_items, L+1]`` without padding (``assignment.codes``, the payload's
            ``codes``). None counts every item as changed.
        margin: sticky codes: with ``previous``, an item keeps its previous code at each quantizer
            level unless the nearest code is closer by more than this relative margin (squared
            distances; ``tokenizer.sticky_codes``). 0: every item takes its nearest codes. The last
            level's previous code is the one FORGE gave it.
        batch_size: items per tokenizer call.
        sender: the object emitting ``codes_assigned`` (the trainer).
        stage: the stage reported in the payload, the sender's (joint training is where codes change).
        device: where the returned tensor lives; ``item_embeddings.device`` when None.

    Raises:
        ValueError: on malformed input; :class:`~etegrec.forge.CodeOverflowError` (a ValueError)
            when a full code is shared by more items than ``code_num``.
    """
    started = time.perf_counter()
    if item_embeddings.ndim != 2 or item_embeddings.shape[0] < 2:
        raise ValueError(f"item_embeddings has shape {tuple(item_embeddings.shape)!r}; pass "
                         f"[n_items + 1, d] with the padding item in row 0 and at least one item.")
    if operator.index(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size!r} must be at least 1; pass a positive batch size.")
    if policy not in POLICIES:  # checked before the tokenizer pass, not after it
        raise ValueError(f"policy={policy!r} is not a FORGE policy; use one of {POLICIES!r}.")
    if not margin >= 0:
        raise ValueError(f"margin={margin!r} must be 0 (nearest codes) or a positive relative margin, e.g. 0.1.")
    n_items = item_embeddings.shape[0] - 1
    code_num = tokenizer.codebook_size if code_num is None else code_num
    need_distances = use_forge and policy == "nearest_free"
    prev = _previous_codes(previous, n_items)
    keep = None
    if margin > 0 and prev is not None:
        keep = torch.tensor(np.asarray(prev)[:, :tokenizer.code_length], dtype=torch.long)  # a copy: prev is read-only
    rq_codes, distances = _encode(tokenizer, item_embeddings[1:], batch_size, need_distances, keep, margin)
    assignment = assign_codes(
        rq_codes, code_num, use_forge=use_forge, policy=policy, distances=distances, previous=prev,
    )
    table = np.zeros((n_items + 1, assignment.codes.shape[1]), np.int64)
    table[1:] = assignment.codes
    codes = torch.from_numpy(table).to(item_embeddings.device if device is None else device)
    if signals.codes_assigned.receivers:
        signals.codes_assigned.send(
            sender, stage=stage, epoch=epoch, codes=assignment.codes, use_forge=use_forge, policy=policy,
            max_conflict=assignment.max_conflict, max_conflict_before=assignment.max_conflict_before,
            collision_rate=assignment.collision_rate, changed=assignment.changed,
            seconds=time.perf_counter() - started,
        )
    return ItemCodes(codes, assignment)


def _encode(
    tokenizer: nn.Module, items: torch.Tensor, batch_size: int, need_distances: bool,
    keep: torch.Tensor | None = None, margin: float = 0.0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """RQ codes ``[n, L]`` of ``items`` and, if asked, their last-layer distances ``[n, K]``; with
    ``keep`` ``[n, L]``, the sticky codes of ``tokenizer.sticky_codes`` instead of the nearest."""
    modes = [(module, module.training) for module in tokenizer.modules()]
    param = next(tokenizer.parameters(), None)
    tokenizer_device = items.device if param is None else param.device
    codes, distances = [], []
    tokenizer.eval()
    try:
        with torch.no_grad():
            for start in range(0, items.shape[0], batch_size):
                batch = items[start:start + batch_size].to(tokenizer_device)
                if keep is None:
                    out = tokenizer(batch)
                    batch_codes, last = out.codes, -out.logits[-1]  # (batch, L), (batch, K)
                else:
                    batch_codes, layer_distances = tokenizer.sticky_codes(
                        batch, keep[start:start + batch_size].to(tokenizer_device), margin)
                    last = layer_distances[-1]
                codes.append(batch_codes)
                if need_distances:
                    distances.append(last.float().cpu())
    finally:
        for module, training in modes:
            module.training = training
    rq_codes = torch.cat(codes).cpu().numpy()  # one host transfer for all batches
    return rq_codes, torch.cat(distances).numpy() if need_distances else None


def _previous_codes(previous: Any, n_items: int) -> Any:
    """The previous codes as ``[n_items, L+1]`` without the padding row (None stays None)."""
    if isinstance(previous, ItemCodes):
        return previous.assignment.codes
    if isinstance(previous, torch.Tensor):
        if previous.ndim != 2 or previous.shape[0] != n_items + 1:
            raise ValueError(f"previous is a tensor of shape {tuple(previous.shape)!r}; pass the "
                             f"[n_items + 1, L+1] tensor get_code returned (padding row 0 included).")
        return previous[1:].cpu().numpy()
    return previous
