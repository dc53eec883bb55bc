"""The decoder side of :class:`~etegrec.models.T5Recommender`: its inputs, scores and cached decoding.

The decoder reads a learned BOS vector and then the target's codes, token ``p`` looked up in table
``p`` of ``code_embedding``; its output at position ``p`` is scored against the same table (tied
weights), plus the learned repeat offsets, plus (with item output vectors) the log-mean-exp of the
item scores (the output's dot product with each item's vector) of the items each code leads to.
:meth:`CodeDecoding.decode_logits` is the step-by-step decoder of beam search, on the T5 weights through :class:`~etegrec.models.t5_decoding.T5Decoding`.
"""
from __future__ import annotations

import torch
from torch import nn

from etegrec.models.beam import CodeTrie
from etegrec.models.code_history import additive_mask, recency_cross_mask, repeat_hits
from etegrec.models.t5_decoding import DecoderCache, T5Decoding

__all__ = ["CodeDecoding", "log_mean_exp"]


def log_mean_exp(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(..., n_groups): the log of the mean of ``exp(values)`` (..., P) over each group of the last dimension
    (``group`` (P,), the same for every row); 0 for an empty group (and no gradient there). Stable: each
    group's largest value is taken out first."""
    lead = values.shape[:-1]
    top = values.new_full((*lead, n_groups), float("-inf")).scatter_reduce(
        -1, group.expand(*lead, -1), values.detach(), "amax")
    counts = torch.bincount(group, minlength=n_groups)
    filled = counts > 0
    top = torch.where(filled, top, 0.0)
    sums = values.new_zeros(*lead, n_groups).index_add(-1, group, torch.exp(values - top.index_select(-1, group)))
    return torch.where(filled, torch.log(torch.where(filled, sums, 1.0) / counts.clamp_min(1)) + top, 0.0)


class CodeDecoding:
    """Decoder-side methods of :class:`~etegrec.models.T5Recommender` (a mixin of it).

    They read the recommender's ``code_embedding`` (L, K, d), ``bos`` (d,), ``repeat_logit`` (L,) or
    None, ``cross_recency`` (heads, max_history) or None, ``item_output`` (an embedding of
    ``n_items + 1`` rows) or None with the ``output_trie`` of the codes in use, its T5 ``decoder``
    stack and its sizes.
    """

    decoder: nn.Module  # the T5 decoder stack
    code_embedding: torch.Tensor
    bos: torch.Tensor
    repeat_logit: torch.Tensor | None
    repeat_item_logit: torch.Tensor | None
    cross_recency: torch.Tensor | None
    item_output: nn.Embedding | None
    item_state: str  # "each" or "first": the decoder state the item output vectors score at each position
    output_trie: CodeTrie | None
    code_num: int
    code_length: int
    d_model: int
    training: bool

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., t, d) of ``codes`` (..., t), token j looked up in table j (t <= L)."""
        positions = torch.arange(codes.shape[-1], device=codes.device)
        return self.code_embedding[positions, codes]

    def _decoder_inputs(self, prefix_codes: torch.Tensor) -> torch.Tensor:
        """BOS then the embedded ``prefix_codes`` (N, t): decoder inputs (N, t + 1, d)."""
        bos = self.bos.expand(prefix_codes.shape[0], 1, self.d_model)
        return torch.cat([bos, self._embed(prefix_codes)], dim=1)

    def _score(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """Tied logits: ``hidden`` (N, L, d) -> (N, L, K), or (N, d) -> (N, K) for one ``position``."""
        scale = self.d_model ** -0.5
        if position is None:
            return torch.einsum("nld,lkd->nlk", hidden, self.code_embedding) * scale
        return (hidden @ self.code_embedding[position].T) * scale

    def use_trie(self, trie: CodeTrie) -> None:
        """The item codes in use, as their prefix trie: with :attr:`item_output` the scores of every code read
        which items it leads to. Call it whenever the codes change (the joint trainer does at every refresh)."""
        self.output_trie = trie

    def _output_trie(self) -> CodeTrie:
        if self.output_trie is None:
            raise ValueError("this recommender has item output vectors: tell it the item codes in use with "
                             "use_trie(CodeTrie(codes, code_num=...)) before calling it")
        return self.output_trie

    def item_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every item's score (N, n_items) for decoder states ``hidden`` (N, d): the dot product with its
        :attr:`item_output` vector, on the tied logits' scale (column ``i`` = item ``i + 1``)."""
        return (hidden @ self._item_vectors(hidden.dtype).T) * self.d_model ** -0.5

    def _with_repeats(self, item_logits: torch.Tensor, history_items: torch.Tensor | None) -> torch.Tensor:
        """``item_logits`` (N, n_items) plus :attr:`repeat_item_logit` for the items of each row's history
        ``history_items`` (N, H) (ids, 0 = padding); unchanged without that offset."""
        if self.repeat_item_logit is None:
            return item_logits
        # Each distinct history item once (no padding), added at its own column: no dense (N, n_items) mask
        # to build, multiply and add, and the same values and gradients as that mask.
        ids = self._repeat_history(history_items).sort(1).values
        first = ids != 0
        first[:, 1:] &= ids[:, 1:] != ids[:, :-1]
        rows, at = first.nonzero(as_tuple=True)
        offsets = self.repeat_item_logit.to(item_logits.dtype).expand(len(rows))
        return item_logits.index_put((rows, ids[rows, at] - 1), offsets, accumulate=True)

    def _repeat_history(self, history_items: torch.Tensor | None) -> torch.Tensor:
        if history_items is None:
            raise ValueError("this recommender pushes repeats down at the item (repeat_item_bias): pass the "
                             "history's item ids (history_items, or decoder_cache(..., history_items=...))")
        return history_items

    def _item_vectors(self, dtype: torch.dtype) -> torch.Tensor:
        """The items' output vectors (n_items, d), without the padding row."""
        return self.item_output.weight[1:].to(dtype)

    def _item_scores(self, hidden: torch.Tensor, prefix_codes: torch.Tensor,
                     history_items: torch.Tensor | None = None) -> torch.Tensor:
        """With item output vectors: (N, K) offsets of code position ``t`` after ``prefix_codes`` (N, t)
        (``history_items`` (N, H): each row's history, read by :attr:`repeat_item_logit`).

        Each item scores ``hidden`` (N, d) by :meth:`item_logits`; code ``k`` gets the log-mean-exp of the
        scores of the items whose codes start with the prefix and ``k``, 0 where no item does. As SASRec's
        probability of a group of items is the sum of its items', a code then scores high when one item
        under it does: the first code's choice can follow a single item, and from the second code on,
        where a prefix names one item or a few, each item has an output vector of its own. The vectors
        belong to items, not codes, so they survive a code refresh; all zero, they add nothing.
        """
        trie = self._output_trie()
        t = prefix_codes.shape[1]
        if t == 0:  # every item is under the empty prefix: score them all at once, grouped by first code
            return self._first_item_scores(self._with_repeats(self.item_logits(hidden), history_items))
        rows, items = trie.items_under(trie.node_of(prefix_codes), t)  # below: the items under each prefix
        values = (hidden[rows] * self._item_vectors(hidden.dtype)[items]).sum(-1) * self.d_model ** -0.5
        if self.repeat_item_logit is not None:  # item items + 1 is in row rows' history
            seen = (self._repeat_history(history_items)[rows] == items[:, None] + 1).any(1)
            values = values + seen.to(values.dtype) * self.repeat_item_logit
        group = rows * self.code_num + trie.codes[items, t]  # (row, the item's code at t)
        return log_mean_exp(values, group, len(hidden) * self.code_num).view(len(hidden), self.code_num)

    def _item_state(self, hidden: torch.Tensor, t: int) -> torch.Tensor:
        """The decoder state (N, d) the item vectors score at position ``t`` of teacher-forced ``hidden`` (N, L, d)."""
        return hidden[:, 0] if self.item_state == "first" else hidden[:, t]

    def _first_item_scores(self, item_logits: torch.Tensor) -> torch.Tensor:
        """The first code's offsets (N, K) from every item's score (N, n_items)."""
        return log_mean_exp(item_logits, self._output_trie().codes[:, 0], self.code_num)

    def _item_scores_all(self, hidden: torch.Tensor, target_codes: torch.Tensor,
                         history_items: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_item_scores` of every teacher-forced position, (N, L, d) -> (N, L, K), and the first
        position's item scores (N, n_items) (:meth:`item_logits` plus the repeat offsets; with ``item_state``
        "first", every position's offsets come from them)."""
        first = self._with_repeats(self.item_logits(hidden[:, 0]), history_items)
        offsets = [self._first_item_scores(first)] + [
            self._item_scores(self._item_state(hidden, t), target_codes[:, :t], history_items)
            for t in range(1, self.code_length)]
        return torch.stack(offsets, dim=1), first

    def _cross_mask(self, attention_mask: torch.Tensor, target_at: torch.Tensor) -> torch.Tensor:
        """Cross-attention mask of decoder queries whose target follows encoder position ``target_at``
        (Q,): with a causal encoder the (B, heads, Q, T) additive :func:`recency_cross_mask`, without
        one the plain (B, T) key mask."""
        if self.cross_recency is None:
            return attention_mask
        return recency_cross_mask(attention_mask, target_at, self.cross_recency, self.code_embedding.dtype)

    def history_bias(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, prefix_codes: torch.Tensor
    ) -> torch.Tensor | None:
        """The learned repeat offsets (N, K) for code position ``t`` after ``prefix_codes`` (N, t).

        Code ``k`` gets ``repeat_logit[t]`` when some real item of the row's history has the codes
        ``prefix_codes`` followed by ``k``: choosing ``k`` keeps a repeat of that item possible. Row
        ``n`` of ``prefix_codes`` belongs to history ``n // G`` of ``history_codes`` (B, H, L) and
        ``history_mask`` (B, H), as in :meth:`decode_logits`. None when the model has no repeat bias.
        """
        if self.repeat_logit is None:
            return None
        hits = repeat_hits(history_codes, history_mask, prefix_codes, code_num=self.code_num,
                           dtype=self.repeat_logit.dtype)  # (N, K)
        return hits * self.repeat_logit[prefix_codes.shape[1]]

    def _history_bias_all(
        self, history_codes: torch.Tensor, history_mask: torch.Tensor, target_codes: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`history_bias` of every teacher-forced position: (B, L, K)."""
        return torch.stack([self.history_bias(history_codes, history_mask, target_codes[:, :t])
                            for t in range(self.code_length)], dim=1)

    def decoder_cache(
        self, encoder_states: torch.Tensor, attention_mask: torch.Tensor, *, incremental: bool = True,
        history_items: torch.Tensor | None = None,
    ) -> DecoderCache:
        """Cross-attention keys/values of ``encoder_states`` (B, T, d) for :meth:`decode_logits`, and the
        histories' item ids ``history_items`` (B, H) that :attr:`repeat_item_logit` reads."""
        dtype = encoder_states.dtype
        if self.cross_recency is not None:  # the target follows the last position
            last = torch.full((1,), encoder_states.shape[1] - 1, device=encoder_states.device)
            bias = self._cross_mask(attention_mask.bool(), last).to(dtype)  # (B, heads, 1, T)
        else:
            bias = additive_mask(attention_mask.bool(), dtype)[:, None, None, :]  # (B, 1, 1, T)
        cache = T5Decoding(self.decoder).cache(encoder_states, bias, incremental=incremental)
        cache.history_items = history_items
        return cache

    def decode_logits(
        self,
        encoder_states: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_codes: torch.Tensor,
        *,
        cache: DecoderCache | None = None,
        history_items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (N, K) of code position ``t`` after ``prefix_codes`` (N, t); inference, no dropout.

        ``encoder_states`` (B, T, d) and ``attention_mask`` (B, T) come from :meth:`encode`, once per
        history; N must be a multiple G of B and row ``n`` of ``prefix_codes`` continues history
        ``n // G`` (the beams of a history are consecutive rows, as ``repeat_interleave`` lays them
        out); ``history_items`` (B, H), the histories' item ids, serve a model with :attr:`repeat_item_logit`
        when no ``cache`` is given (a cache holds its own). Without ``cache`` the cross-attention keys and
        values are computed in this call; with an
        incremental ``cache`` (from :meth:`decoder_cache`) only the newest prefix token is run, the
        cache must hold exactly t tokens and the caller re-aligns it with ``cache.reorder`` whenever
        it reorders or repeats rows.

        Raises:
            ValueError: in training mode, for ``t >= code_length``, N not a multiple of B, or a cache
                of the wrong length.
        """
        if self.training:
            raise ValueError(
                "T5Recommender.decode_logits runs without dropout and is for inference only; call "
                "model.eval() first."
            )
        rows, t = prefix_codes.shape
        batch = encoder_states.shape[0]
        if t >= self.code_length or rows % batch:
            raise ValueError(
                f"decode_logits got prefix_codes of shape {tuple(prefix_codes.shape)!r} for "
                f"{batch} encoded histories; pass fewer than code_length={self.code_length} codes "
                "per row and a whole number of rows per history."
            )
        if cache is None:
            cache = self.decoder_cache(encoder_states, attention_mask, incremental=False, history_items=history_items)
        if cache.incremental:
            if cache.length != t:
                raise ValueError(
                    f"the decoder cache holds {cache.length} tokens but prefix_codes has {t}; "
                    "feed the prefixes one code longer per call, starting from an empty prefix."
                )
            new_inputs = self._decoder_inputs(prefix_codes)[:, t:]  # (N, 1, d)
        else:
            cache.self_kv = None
            new_inputs = self._decoder_inputs(prefix_codes)  # (N, t + 1, d)
        hidden = T5Decoding(self.decoder).step(new_inputs, cache, group=rows // batch)  # (N, s, d)
        logits = self._score(hidden[:, -1], t)
        if self.item_output is not None:
            state = hidden[:, -1]
            if self.item_state == "first":  # the BOS position's output: this call's at t = 0, else kept by the cache
                if t == 0 or not cache.incremental:
                    cache.first_state = hidden[:, 0]
                state = cache.first_state
            history = None  # each row's history, for the item repeat offset only
            if self.repeat_item_logit is not None and cache.history_items is not None:
                history = cache.history_items.repeat_interleave(rows // batch, 0)
            logits = logits + self._item_scores(state, prefix_codes, history)
        return logits
