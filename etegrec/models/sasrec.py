"""SASRec: the project's sequential baseline and the source of the collaborative item embeddings.

Histories are LEFT-padded with item id 0: the most recent item sits at the last position. Positions
are counted from the right end (the last position always gets position embedding ``max_len - 1``),
so a history shorter than ``max_len`` gives the same output as the same history left-padded to
``max_len``. Padded positions are masked out as attention keys, so the amount of padding never
changes the outputs at real positions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SASRec", "window_targets"]


def window_targets(windows: torch.Tensor, counted: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs (B, W), next items (B, W) and which of them are scored (B, W) of left-padded ``windows``
    (B, W + 1): a real item after a real input, among the row's last ``counted`` (B,) positions when
    given (an overlapping window scores only the targets the previous one did not)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    scored = (inputs != 0) & (targets != 0)
    if counted is not None:
        width = inputs.shape[1]
        scored &= torch.arange(width, device=windows.device)[None, :] >= (width - counted)[:, None]
    return inputs, targets, scored


class SASRec(nn.Module):
    """Causal self-attention next-item model with a tied item embedding table.

    Args:
        n_items: number of real items; item ids run 1..n_items, 0 is padding.
        hidden: embedding and model width.
        n_layers: transformer blocks.
        n_heads: attention heads per block.
        dropout: dropout on the input embeddings, attention and feed-forward layers.
        max_len: longest history the model accepts (positions available).
        ffn_dim: inner width of the feed-forward layers; ``None`` means ``hidden`` (original SASRec).
        tied_output: score items against the input embedding table (True) or against a separate
            output table ``output_emb`` (False); ``item_embeddings()`` is the input table either way.
        repeat_bias: add a learned scalar ``repeat_bias`` to the logit of every item in the model's
            input (the history so far). It starts at 0 and learns how likely a user is to repeat an
            item: strongly negative where items never repeat (ml-100k), positive where repeats are
            common. It is part of the model, not an evaluation mask: the evaluation still ranks all items.

    Raises:
        ValueError: for a non-positive size or a ``hidden`` not divisible by ``n_heads``.
    """

    def __init__(
        self,
        *,
        n_items: int,
        hidden: int = 256,
        n_layers: int = 2,
        n_heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 20,
        ffn_dim: int | None = None,
        tied_output: bool = True,
        repeat_bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("n_items", n_items), ("hidden", hidden), ("n_layers", n_layers),
                            ("n_heads", n_heads), ("max_len", max_len)):
            if value < 1:
                raise ValueError(f"SASRec {name}={value!r} must be a positive integer.")
        if hidden % n_heads:
            raise ValueError(
                f"SASRec hidden={hidden!r} is not divisible by n_heads={n_heads!r}; "
                "pick a hidden size that is a multiple of n_heads."
            )
        self.n_items = n_items
        self.hidden = hidden
        self.n_heads = n_heads
        self.max_len = max_len
        self.item_emb = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_norm = nn.LayerNorm(hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=hidden,
                nhead=n_heads,
                dim_feedforward=ffn_dim or hidden,
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(n_layers)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.output_emb = None if tied_output else nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.apply(self._init_weights)
        self.repeat_bias = nn.Parameter(torch.zeros(())) if repeat_bias else None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def _attention_mask(self, history: torch.Tensor) -> torch.Tensor:
        # True = may not attend. Real queries see real keys at or before them; a padded query sees
        # only itself (a fully masked row would give NaN, which would leak through 0 * NaN).
        batch, length = history.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
        allowed = causal & (history != 0)[:, None, :]  # (batch, T, T)
        allowed |= torch.eye(length, dtype=torch.bool, device=history.device)
        return (~allowed).repeat_interleave(self.n_heads, dim=0)  # (batch * heads, T, T)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        """Hidden state at every position of left-padded ``history`` (batch, T), T <= max_len."""
        if history.dim() != 2 or history.shape[1] > self.max_len:
            raise ValueError(
                f"SASRec expects histories of shape (batch, T) with T <= max_len={self.max_len}, "
                f"got {tuple(history.shape)!r}; truncate to the last {self.max_len} items."
            )
        length = history.shape[1]
        positions = torch.arange(self.max_len - length, self.max_len, device=history.device)
        x = self.item_emb(history) + self.pos_emb(positions)  # (batch, T, hidden)
        x = self.emb_dropout(self.emb_norm(x))
        mask = self._attention_mask(history)
        for block in self.blocks:
            x = block(x, src_mask=mask)
        return self.final_norm(x)  # (batch, T, hidden)

    def item_embeddings(self) -> torch.Tensor:
        """The input item embedding table (n_items + 1, hidden); row 0 is padding."""
        return self.item_emb.weight

    def _logits(self, states: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """Item logits of ``states`` (..., hidden); ``seen`` (..., n_items + 1), 1 for the items in
        each state's input, gets the repeat bias (when the model has one)."""
        table = self.item_emb if self.output_emb is None else self.output_emb
        logits = states @ table.weight.T  # (..., n_items + 1)
        if self.repeat_bias is not None and seen is not None:
            logits = logits + self.repeat_bias * seen
        logits[..., 0] = float("-inf")
        return logits

    def _seen(self, inputs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(n, n_items + 1): 1 for the items of ``inputs[rows[i], :positions[i] + 1]``, the history of
        each scored position (column 0, padding, may be set: its logit is -inf anyway)."""
        history = inputs[rows]  # (n, T)
        visible = torch.arange(inputs.shape[1], device=inputs.device)[None, :] <= positions[:, None]
        seen = torch.zeros(len(rows), self.n_items + 1, device=inputs.device)
        return seen.scatter_(1, history * visible, 1.0)

    @staticmethod
    def _seen_among(inputs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor,
                    drawn: torch.Tensor) -> torch.Tensor:
        """(n, 1 + M) bool: whether the target and each drawn item are in the history of each scored
        position. The history items are looked up among the sorted distinct draws, so the cost is
        n * (T log M + M), not the n * T * M of comparing every history item with every draw."""
        visible = torch.arange(inputs.shape[1], device=inputs.device)[None, :] <= positions[:, None]
        history = inputs[rows] * visible  # (n, T): each scored position's history, 0 elsewhere
        distinct, column = torch.unique(drawn, return_inverse=True)  # (U,) sorted, (M,) index into it
        at = torch.searchsorted(distinct, history).clamp_max(len(distinct) - 1)  # (n, T)
        found = (distinct[at] == history) & (history != 0)
        seen = torch.zeros(len(history), len(distinct) + 1, dtype=torch.bool, device=history.device)
        seen.scatter_(1, torch.where(found, at, len(distinct)), True)  # column U collects the misses
        return torch.cat([(history == targets[:, None]).any(dim=1, keepdim=True), seen[:, column]], dim=1)

    def score(self, history: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n_items + 1) of the next item after each history; column 0 is -inf."""
        seen = None
        if self.repeat_bias is not None:
            seen = torch.zeros(history.shape[0], self.n_items + 1, device=history.device)
            seen.scatter_(1, history, 1.0)
        return self._logits(self.forward(history)[:, -1], seen)

    def window_loss(self, seq: torch.Tensor, counted: torch.Tensor | None = None, *,
                    negatives: int | None = None) -> torch.Tensor:
        """Mean cross-entropy of the next items inside left-padded windows.

        ``seq`` (batch, T + 1) holds T + 1 consecutive items; position t predicts ``seq[:, t + 1]``
        from ``seq[:, :t + 1]``. Targets that are padding, and targets whose input is padding (an
        empty history), are ignored. ``counted`` (batch,), when given, keeps only the last
        ``counted[b]`` targets of window b (overlapping windows predict each item once).

        ``negatives`` None: the full softmax over every item. A number M: a sampled softmax over the
        target and M items drawn uniformly (with replacement, from torch's generator) and shared by
        every target of the batch, so a step costs M + 1 logits per target whatever the catalogue's
        size. The logQ correction: each drawn item's logit minus ``log(M / n_items)``, its expected
        count among the draws, and a drawn copy of the target (an accidental hit) masked, so the
        normalizer estimates the full softmax's without bias and the loss tends to the full one as M grows.
        """
        inputs, targets, scored = window_targets(seq, counted)  # (batch, T) each
        rows, positions = scored.nonzero(as_tuple=True)  # (n,) each
        # Logits only where a target is scored: short histories leave most of a window padded, and
        # the (targets, n_items) logit matrix is the stage's largest cost.
        states = self.forward(inputs)[rows, positions]  # (n, hidden)
        targets = targets[rows, positions]  # (n,)
        if negatives is not None:
            return self._sampled_loss(states, targets, inputs, rows, positions, negatives)
        seen = self._seen(inputs, rows, positions) if self.repeat_bias is not None else None
        logits = self._logits(states, seen)  # (n, n_items + 1)
        return F.cross_entropy(logits, targets)

    def _sampled_loss(self, states: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor, rows: torch.Tensor,
                      positions: torch.Tensor, negatives: int) -> torch.Tensor:
        """Cross-entropy of each target against ``negatives`` uniformly drawn items shared by the batch."""
        if negatives < 1:
            raise ValueError(f"negatives={negatives!r} must be a positive number of sampled items; pass e.g. 1024.")
        table = (self.item_emb if self.output_emb is None else self.output_emb).weight
        drawn = torch.randint(1, self.n_items + 1, (negatives,), device=states.device)  # (M,)
        log_count = math.log(negatives / self.n_items)  # every item's expected count among the draws, logged
        logits = torch.cat([(states * table[targets]).sum(-1, keepdim=True), states @ table[drawn].T - log_count],
                           dim=1)  # (n, 1 + M)
        if self.repeat_bias is not None:
            logits = logits + self.repeat_bias * self._seen_among(inputs, rows, positions, targets, drawn)
        hit = torch.cat([torch.zeros_like(targets[:, None], dtype=torch.bool), drawn[None, :] == targets[:, None]], dim=1)
        logits = logits.masked_fill(hit, float("-inf"))  # (n, 1 + M)
        return F.cross_entropy(logits, torch.zeros_like(targets))
