"""Item-code histories as :class:`~etegrec.models.T5Recommender` reads them: checks, masks, repeats.

A history is ``history_codes`` (B, H, L), one row of L codes per item, with ``history_mask`` (B, H),
True for a real item and False for (left) padding.
"""
from __future__ import annotations

import torch

__all__ = [
    "additive_mask",
    "causal_mask",
    "check_history",
    "check_history_values",
    "recency_cross_mask",
    "repeat_hits",
]


def check_history(history_codes: torch.Tensor, history_mask: torch.Tensor, *, code_length: int) -> None:
    """Raise ValueError unless ``history_codes`` is (B, H, code_length) and ``history_mask`` (B, H).

    Shapes only: nothing is read back from the device.
    """
    if history_codes.dim() != 3 or history_codes.shape[2] != code_length:
        raise ValueError(
            f"history_codes must have shape (batch, history, {code_length}), got "
            f"{tuple(history_codes.shape)!r}; pass code_length={code_length} codes per item."
        )
    if history_mask.shape != history_codes.shape[:2]:
        raise ValueError(
            f"history_mask has shape {tuple(history_mask.shape)!r} but history_codes has "
            f"{tuple(history_codes.shape)!r}; pass one mask entry (True = real item) per item."
        )


def check_history_values(history_codes: torch.Tensor, history_mask: torch.Tensor, *, code_num: int) -> None:
    """Raise ValueError for a real item's code outside ``[0, code_num)`` or a row without real items.

    ``history_mask`` must be boolean. Reads two flags back to the host: a device sync off the CPU.
    """
    real = history_codes[history_mask]  # (n_real, L)
    # host sync: the verdict is needed on the host to raise; callers decide when that is worth it
    bad_code, empty = torch.stack([
        ((real < 0) | (real >= code_num)).any(), ~history_mask.any(dim=1).all()
    ]).tolist()
    if bad_code:
        raise ValueError(
            f"history_codes of real items must lie in [0, {code_num}), got values in "
            f"[{int(real.min())}, {int(real.max())}]; build the model with a code_num that "
            "covers every code (suffix tokens included)."
        )
    if empty:
        rows = (~history_mask.any(dim=1)).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"history rows {rows!r} have no real item (history_mask all False); drop samples "
            "with an empty history."
        )


def causal_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) key mask -> (B, 1, T, T): query q sees real keys k <= q (and itself, so no row is empty)."""
    t = mask.shape[1]
    lower = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
    return ((mask[:, None, None, :] & lower) | torch.eye(t, dtype=torch.bool, device=mask.device))


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as T5's additive one: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def recency_cross_mask(
    attention_mask: torch.Tensor, target_at: torch.Tensor, cross_recency: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive cross-attention mask (B, heads, Q, T) of decoder queries whose target follows encoder
    position ``target_at`` (Q,): real states ``<= target_at`` only (``attention_mask`` (B, T)), plus
    the learned bias ``cross_recency`` (heads, max_history) of their distance from the target."""
    keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    distance = target_at[:, None] - keys[None, :]  # (Q, T)
    allowed = attention_mask[:, None, None, :] & (distance >= 0)[None, None]  # (B, 1, Q, T)
    bias = cross_recency[:, distance.clamp(0, cross_recency.shape[1] - 1)]  # (heads, Q, T)
    return (additive_mask(allowed, dtype) + bias[None]).to(dtype)


def repeat_hits(
    history_codes: torch.Tensor, history_mask: torch.Tensor, prefix_codes: torch.Tensor, *, code_num: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(N, code_num) 1 where code ``k`` after ``prefix_codes`` (N, t) continues a real history item, else 0.

    Row ``n`` of ``prefix_codes`` belongs to history ``n // G`` of ``history_codes`` (B, H, L) and
    ``history_mask`` (B, H), N = B * G.
    """
    rows, t = prefix_codes.shape
    group = rows // history_codes.shape[0]
    history_codes = history_codes.repeat_interleave(group, dim=0)  # (N, H, L)
    match = history_mask.bool().repeat_interleave(group, dim=0)  # (N, H)
    if t:
        match = match & (history_codes[:, :, :t] == prefix_codes[:, None, :]).all(dim=2)
    hits = torch.zeros(rows, code_num, device=prefix_codes.device, dtype=dtype)
    # amax: items sharing a code do not overwrite each other's 1
    hits.scatter_reduce_(1, history_codes[:, :, t], match.to(hits.dtype), reduce="amax")
    return hits
