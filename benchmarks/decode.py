"""Evaluation throughput of beam search on the paper-size T5 recommender (random weights, one thread).

Run: ``python benchmarks/decode.py``; prints a table of sequences per second and writes
``benchmarks/results/decode.json``. Settings: 1,349 items with random unique 4-codes over 256,
histories of 20 items, batch 256, beam 20, top 10, ``torch.set_num_threads(1)``. The reference
implementation (Hugging Face ``generate`` with ``prefix_allowed_tokens_fn``) does 5.5 sequences/s
here; the target is >= 10x that.

Variants: the default (incremental decoding with the decoder KV cache, cross-attention keys and
values computed once per history and shared by its beams), ``rerun`` (same shared cross-attention
cache, but every step re-runs the decoder over the whole prefix), ``no cache`` (``decode_logits``
alone: cross-attention keys and values recomputed at every step) and ``naive`` (what ``generate``
does: encoder states copied per beam and the T5 decoder stack re-run over the prefix; timed on a
smaller batch, it is slow).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from etegrec.models import CodeTrie, T5Recommender, beam_search

N_ITEMS, CODE_LEN, CODE_NUM, HISTORY, BATCH, BEAM, TOP_K, SEED = 1349, 4, 256, 20, 256, 20, 10, 0
BATCHES, NAIVE_BATCH, REFERENCE = 3, 32, 5.5
RESULT = Path(__file__).resolve().parent / "results" / "decode.json"


class Rerun:
    """The model with a cache that keeps only the cross-attention part (prefix re-run every step)."""

    def __init__(self, model: T5Recommender) -> None:
        self.model, self.encode, self.decode_logits = model, model.encode, model.decode_logits

    def decoder_cache(self, states: torch.Tensor, mask: torch.Tensor):
        return self.model.decoder_cache(states, mask, incremental=False)


class NoCache:
    """The model seen through ``encode`` / ``decode_logits`` only."""

    def __init__(self, model: T5Recommender) -> None:
        self.encode, self.decode_logits = model.encode, model.decode_logits


class Naive:
    """Per-beam copies of the encoder states through the T5 decoder stack, as ``generate`` does."""

    def __init__(self, model: T5Recommender) -> None:
        self.model, self.encode = model, model.encode

    def decode_logits(self, states: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor):
        m, group = self.model, prefix.shape[0] // states.shape[0]
        hidden = m.decoder(
            inputs_embeds=m._decoder_inputs(prefix),
            encoder_hidden_states=states.repeat_interleave(group, dim=0),
            encoder_attention_mask=mask.repeat_interleave(group, dim=0),
            use_cache=False,
        ).last_hidden_state
        return m._score(hidden[:, -1], prefix.shape[1])


def random_item_codes(gen: torch.Generator) -> torch.Tensor:
    flat = torch.randperm(CODE_NUM ** 3, generator=gen)[:N_ITEMS]  # unique 3-code prefixes ...
    prefix = torch.stack([flat // CODE_NUM ** 2, flat // CODE_NUM % CODE_NUM, flat % CODE_NUM], 1)
    suffix = torch.randint(0, CODE_NUM, (N_ITEMS, 1), generator=gen)  # ... so any suffix is unique
    return torch.cat([prefix, suffix], dim=1)  # (n_items, 4)


def search(model, histories, mask, trie, constrained: bool):
    started = time.perf_counter()
    out = beam_search(model, histories, mask, trie, beam_size=BEAM, top_k=TOP_K,
                      constrained=constrained)
    return time.perf_counter() - started, out


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = T5Recommender(code_num=CODE_NUM, code_length=CODE_LEN).eval()  # paper size
    item_codes = random_item_codes(gen)
    trie = CodeTrie(item_codes, code_num=CODE_NUM)
    items = torch.randint(1, N_ITEMS + 1, (BATCH * BATCHES, HISTORY), generator=gen)
    histories = item_codes[items - 1]  # (n, 20, 4)
    mask = torch.ones(items.shape, dtype=torch.bool)

    # The fast variants take turns batch by batch, so that load from other processes hits all alike.
    variants = {"constrained": (model, True), "unconstrained": (model, False),
                "constrained, rerun": (Rerun(model), True)}
    seconds = {name: [] for name in variants}
    outputs = {name: [] for name in variants}
    search(model, histories[:BATCH], mask[:BATCH], trie, True)  # warm-up
    for b in range(BATCHES):
        rows = slice(b * BATCH, (b + 1) * BATCH)
        for name, (searcher, constrained) in variants.items():
            took, out = search(searcher, histories[rows], mask[rows], trie, constrained)
            seconds[name].append(took)
            outputs[name].append(out)
    slow = {"constrained, no cache": (NoCache(model), BATCH),
            "constrained, naive": (Naive(model), NAIVE_BATCH)}
    for name, (searcher, batch) in slow.items():
        took, out = search(searcher, histories[:batch], mask[:batch], trie, True)
        seconds[name], outputs[name] = [took], [out]

    results, checks = {}, {}
    found = torch.cat([o.items for o in outputs["constrained"]])
    checks["constrained: all ids are items"] = bool(found.ge(1).all() and found.le(N_ITEMS).all())
    for name, times in seconds.items():
        batch = BATCH if len(times) > 1 or name not in slow else slow[name][1]
        results[name] = {
            "sequences_per_second": batch * len(times) / sum(times),
            "best_batch_sequences_per_second": batch / min(times),
            "seconds": times, "sequences": batch * len(times), "batch": batch,
        }
        if name.startswith("constrained,"):  # another decoding path: the same top-1 items
            same = outputs[name][0].items[:, 0] == outputs["constrained"][0].items[:batch, 0]
            checks[f"{name}: same top-1 share"] = float(same.float().mean())

    print(f"beam search, paper-size T5 (random weights), {N_ITEMS} items x {CODE_LEN} codes over "
          f"{CODE_NUM}, history {HISTORY}, beam {BEAM}, top {TOP_K}, 1 thread, "
          f"torch {torch.__version__}")
    print(f"{'variant':<24}{'sequences':>10}{'seconds':>9}{'seq/s':>8}{'best':>8}{'vs 5.5':>9}")
    for name, r in results.items():
        per_second = r["sequences_per_second"]
        print(f"{name:<24}{r['sequences']:>10}{sum(r['seconds']):>9.2f}{per_second:>8.1f}"
              f"{r['best_batch_sequences_per_second']:>8.1f}{per_second / REFERENCE:>8.1f}x")
    print("checks:", checks)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "n_items": N_ITEMS, "code_length": CODE_LEN, "code_num": CODE_NUM, "history": HISTORY,
        "batch": BATCH, "beam": BEAM, "top_k": TOP_K, "threads": 1, "seed": SEED,
        "reference_sequences_per_second": REFERENCE, "results": results, "checks": checks,
        "speedup_constrained": results["constrained"]["sequences_per_second"] / REFERENCE,
        "speedup_unconstrained": results["unconstrained"]["sequences_per_second"] / REFERENCE,
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "processor": platform.processor(),
    }, indent=2) + "\n")
    if not checks["constrained: all ids are items"]:
        raise SystemExit("constrained beam search returned an id that is no item.")


if __name__ == "__main__":
    main()
