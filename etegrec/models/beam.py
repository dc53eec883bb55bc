"""Batched beam search over item code positions, constrained by a prefix trie of the real items.

A model fit for :func:`beam_search` has two methods (as :class:`~etegrec.models.T5Recommender`):

- ``encode(history_codes, history_mask) -> (encoder_states, attention_mask)``, each with the
  history batch B as first dimension (and ``history_items=`` (B, H) item ids when passed to
  :func:`beam_search`);
- ``decode_logits(encoder_states, attention_mask, prefix_codes) -> logits`` (N, code_num) of code
  position ``t`` for ``prefix_codes`` (N, t), N a multiple G of B, row ``n`` continuing history
  ``n // G``.

Optionally ``history_bias(history_codes, history_mask, prefix_codes) -> (N, code_num) | None``
adds the model's own offsets (its learned repeat bias) to the logits of every step.

Optionally ``decoder_cache(encoder_states, attention_mask)`` (and ``history_items=`` when passed to
:func:`beam_search`) returns a cache with a
``reorder(rows)`` method; :func:`beam_search` then passes it as ``decode_logits(..., cache=cache)``
and re-aligns it after every step, so each step runs only the newest token.

Scores are the model's log-probabilities: ``log_softmax`` over all codes, summed over positions.
The trie only removes continuations that lead to no item (as ``prefix_allowed_tokens_fn`` does in
the reference implementation); ``renormalize=True`` instead takes the ``log_softmax`` over the
allowed codes only.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

__all__ = ["BeamSearchOutput", "CodeTrie", "beam_search"]


class BeamSearchOutput(NamedTuple):
    """Output of :func:`beam_search`, best first."""

    items: torch.Tensor  # (batch, top_k) long item ids (1-based), -1 = no item
    scores: torch.Tensor  # (batch, top_k) float summed log-probabilities, descending; -inf when empty


class CodeTrie:
    """Prefix trie of item codes as dense per-depth transition tables.

    ``next_node[d][node, code]`` (int32) is the depth ``d + 1`` child of a depth-``d`` node reached
    by ``code``, or -1; depth 0 holds the root only, depth L the leaves, and ``leaf_item[leaf]`` is
    the item of a leaf. Memory is 4 * code_num bytes per inner node (1 KiB at code_num 256) and at
    most ``1 + (L - 1) * n_items`` inner nodes: about 0.3 GiB for 1e5 items with 4 x 256 codes in
    the worst case; a catalogue much larger than that wants a sparse (CSR) variant.

    Args:
        item_codes: (n_items, L) codes, row i belonging to item i + 1; rows must be unique.
        code_num: codes per position K.

    Raises:
        ValueError: for a wrong shape, a code outside ``[0, code_num)`` or two items with one code.
    """

    def __init__(self, item_codes: Any, *, code_num: int) -> None:
        codes = torch.as_tensor(item_codes).long().cpu()
        if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise ValueError(
                f"item_codes must have shape (n_items, code_length) with at least one item, got "
                f"{tuple(codes.shape)!r}; pass one row of codes per item."
            )
        if int(codes.min()) < 0 or int(codes.max()) >= code_num:
            raise ValueError(
                f"item_codes lie in [{int(codes.min())}, {int(codes.max())}] but code_num="
                f"{code_num!r}; pass codes in [0, code_num) or a larger code_num."
            )
        n_items, length = codes.shape
        self.code_num = code_num
        self.code_length = length
        self.n_items = n_items
        parent = torch.zeros(n_items, dtype=torch.long)  # every item starts at the root
        n_parents = 1
        self.next_node: list[torch.Tensor] = []
        self.codes = codes  # (n_items, L)
        self.item_node: list[torch.Tensor] = []  # [d - 1]: each item's node at depth d (1..L), row i = item i + 1
        self.nodes_at: list[int] = []  # [d - 1]: how many nodes depth d has
        self._members: dict[int, tuple[torch.Tensor, ...]] = {}  # depth -> items_under's index
        for depth in range(length):
            unique, child, counts = torch.unique(
                codes[:, : depth + 1], dim=0, return_inverse=True, return_counts=True
            )
            if depth == length - 1 and len(unique) < n_items:
                self._raise_duplicates(codes, unique, child, counts)
            table = torch.full((n_parents, code_num), -1, dtype=torch.int32)
            table[parent, codes[:, depth]] = child.to(torch.int32)
            self.next_node.append(table)
            parent, n_parents = child, len(unique)
            self.item_node.append(child)
            self.nodes_at.append(n_parents)
        self.leaf_item = torch.empty(n_items, dtype=torch.long)
        self.leaf_item[parent] = torch.arange(1, n_items + 1)

    @staticmethod
    def _raise_duplicates(
        codes: torch.Tensor, unique: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor
    ) -> None:
        shared = int(counts.argmax())
        items = ((inverse == shared).nonzero().flatten() + 1)[:5].tolist()
        raise ValueError(
            f"item_codes must be unique per item, but items {items!r} share the code "
            f"{tuple(unique[shared].tolist())!r} ({int((counts > 1).sum())} codes are shared); "
            "append the suffix token that separates them (etegrec.forge.assign_codes)."
        )

    def to(self, device: torch.device | str) -> CodeTrie:
        """Move the tables to ``device`` (in place) and return the trie."""
        self.next_node = [table.to(device) for table in self.next_node]
        self.codes = self.codes.to(device)
        self.item_node = [nodes.to(device) for nodes in self.item_node]
        self._members = {}
        self.leaf_item = self.leaf_item.to(device)
        return self

    def node_of(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """The depth-t node (...) of each prefix ``prefix_codes`` (..., t), t <= L; -1 where a prefix
        leads to no item (depth 0: the root, 0)."""
        node = torch.zeros(prefix_codes.shape[:-1], dtype=torch.long, device=prefix_codes.device)
        for depth in range(prefix_codes.shape[-1]):
            child = self.next_node[depth][node.clamp_min(0), prefix_codes[..., depth]].long()
            node = torch.where(node < 0, node, child)
        return node

    def items_under(self, nodes: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (row, item) pair with the item under depth-``depth`` node ``nodes[row]`` (``nodes`` (N,),
        1 <= depth <= L; -1: none): two (P,) tensors, rows ascending; items as rows of the codes (0-based)."""
        if depth not in self._members:  # items ordered by their node, each node's first place and count
            by_node = self.item_node[depth - 1]
            counts = torch.bincount(by_node, minlength=self.nodes_at[depth - 1])
            self._members[depth] = (by_node.argsort(stable=True), torch.cumsum(counts, 0) - counts, counts)
        order, start, counts = self._members[depth]
        sizes = torch.where(nodes >= 0, counts[nodes.clamp_min(0)], 0)
        rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), sizes)
        offset = torch.arange(len(rows), device=nodes.device) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        return rows, order[start[nodes.clamp_min(0)][rows] + offset]

    def allowed(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., L, K) bool: at each position of the items' ``codes`` (..., L), the codes that continue
        the prefix before it towards some item (what constrained decoding lets through there).

        With it, a training loss can normalise each position over the codes that lead to an item,
        as ``beam_search(..., renormalize=True)`` scores them.
        """
        node = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        allowed = []
        for depth, table in enumerate(self.next_node):
            children = table[node.clamp_min(0)]  # (..., K)
            allowed.append((children >= 0) & (node >= 0)[..., None])
            node = torch.where(node < 0, node, children.gather(-1, codes[..., depth:depth + 1]).squeeze(-1).long())
        return torch.stack(allowed, dim=-2)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Item ids (...) of code tuples ``codes`` (..., L); -1 where a tuple is no item."""
        node = self.node_of(codes)
        return torch.where(node < 0, node, self.leaf_item[node.clamp_min(0)])


def _pad(values: torch.Tensor, width: int, fill: float) -> torch.Tensor:
    if values.shape[1] >= width:
        return values[:, :width]
    padding = values.new_full((values.shape[0], width - values.shape[1]), fill)
    return torch.cat([values, padding], dim=1)


@torch.no_grad()
def beam_search(
    model: Any,
    history_codes: torch.Tensor,
    history_mask: torch.Tensor,
    trie: CodeTrie,
    *,
    history_items: torch.Tensor | None = None,
    beam_size: int = 20,
    top_k: int = 10,
    constrained: bool = True,
    renormalize: bool = False,
) -> BeamSearchOutput:
    """Top ``top_k`` items for every history of ``history_codes`` (B, H, L) by beam search.

    Each history is encoded once; its beams share the encoder states. Call it with the model in
    eval mode. With ``constrained`` every beam follows the trie, so every returned id is an item
    (-1 and -inf only when fewer than ``top_k`` items can be reached). Unconstrained (the paper's
    search), the final code tuples are looked up in the trie and a tuple that is no item is
    returned as -1 with its score: it takes a slot in the ranking, as a miss.

    Args:
        model: an ``encode`` / ``decode_logits`` model (see the module docstring).
        history_codes, history_mask: (B, H, L) codes and (B, H) mask (True = real item).
        trie: the :class:`CodeTrie` of the item codes (on the model's device).
        history_items: (B, H) the history's item ids, for a model that reads them (passed to ``encode``).
        beam_size: beams kept per history at every position.
        top_k: items returned per history (at most ``beam_size`` are real).
        constrained: restrict beams to prefixes of real items.
        renormalize: with ``constrained``, normalise each step over the allowed codes only.

    Raises:
        ValueError: for a non-positive ``beam_size`` / ``top_k`` or logits whose width is not the
            trie's ``code_num``.
    """
    if beam_size < 1 or top_k < 1:
        raise ValueError(
            f"beam_search needs beam_size >= 1 and top_k >= 1, got beam_size={beam_size!r}, "
            f"top_k={top_k!r}; pass positive values."
        )
    code_num = trie.code_num
    items = {} if history_items is None else {"history_items": history_items}
    states, attention_mask = model.encode(history_codes, history_mask, **items)
    batch = states.shape[0]
    device = states.device
    if trie.leaf_item.device != device:
        raise ValueError(
            f"the trie is on {trie.leaf_item.device} but the model's states are on {device}; "
            "move it with trie.to(device)."
        )
    cache = model.decoder_cache(states, attention_mask, **items) if hasattr(model, "decoder_cache") else None
    history_bias = getattr(model, "history_bias", None)
    extra = {} if cache is None else {"cache": cache}
    scores = torch.zeros(batch, 1, device=device)  # (B, G) one empty beam per history
    prefixes = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)  # (B, G, t)
    nodes = torch.zeros(batch, 1, dtype=torch.long, device=device)  # (B, G) trie node of each beam
    for depth in range(trie.code_length):
        group = scores.shape[1]
        flat_prefixes = prefixes.reshape(batch * group, depth)
        logits = model.decode_logits(states, attention_mask, flat_prefixes, **extra)
        bias = history_bias(history_codes, history_mask, flat_prefixes) if history_bias else None
        if bias is not None:  # the model's learned repeat offsets are part of its scores
            logits = logits + bias
        if logits.shape != (batch * group, code_num):
            raise ValueError(
                f"decode_logits returned shape {tuple(logits.shape)!r}, expected "
                f"{(batch * group, code_num)!r}; build the trie with the model's code_num."
            )
        logits = logits.float().view(batch, group, code_num)
        children = None
        if constrained:
            # Dead beams (-inf) sit at node -1: read node 0 instead so that indexing stays valid.
            children = trie.next_node[depth][nodes.clamp_min(0)].long()  # (B, G, K)
            if renormalize:
                logits = logits.masked_fill(children < 0, float("-inf"))
        log_probs = logits.log_softmax(dim=-1)
        if children is not None:
            log_probs = log_probs.masked_fill(children < 0, float("-inf"))
        candidates = (scores[..., None] + log_probs).view(batch, group * code_num)
        scores, flat = candidates.topk(min(beam_size, group * code_num), dim=1)  # (B, G')
        parent, code = flat // code_num, flat % code_num
        prefixes = torch.cat(
            [prefixes.gather(1, parent[..., None].expand(-1, -1, depth)), code[..., None]], dim=2
        )
        if children is not None:
            nodes = children.view(batch, group * code_num).gather(1, flat)
        if cache is not None and depth + 1 < trie.code_length:
            rows = parent + group * torch.arange(batch, device=device)[:, None]
            cache.reorder(rows.flatten())
    if constrained:
        alive = torch.isfinite(scores) & (nodes >= 0)
        items = torch.where(alive, trie.leaf_item[nodes.clamp_min(0)], -1)
    else:
        items = trie.lookup(prefixes)
    # topk returned the beams best first; -inf (dead) beams are last.
    return BeamSearchOutput(items=_pad(items, top_k, -1), scores=_pad(scores, top_k, float("-inf")))
