"""What a joint run's ranking owes to each part of its scores: the code logits, or the item vectors.

    python benchmarks/score_parts.py RUN_DIR [RUN_DIR ...] [--users 2000] [--split valid]

With item output vectors (``recommender.item_output``) the recommender scores code ``k`` at level ``t`` as
its code logit (the decoder state against the code's embedding) plus the log-mean-exp of its item
vectors' scores over the items under the prefix and ``k`` (plus the repeat offset). For each run's best
checkpoint this prints NDCG@10 and Recall@10 on the same users of

* the evaluation's beam search, as the run scored itself;
* the same beam search with the code logits scaled by 0 (the item vectors alone route the beam), kept at
  the first level only, or halved;
* the first decoder state's item scores as a full ranking over every item (no codes at all), with and
  without the history's items pushed down (users of the Amazon sets never repeat one);
* how many of the beam's top 10 are history items, and the beam's ranking with them dropped (a top 30 of
  40 beams, the history's items removed: an evaluation mask, which the protocol does not use; it says what
  the repeats cost).

A part whose removal costs little carries little of the ranking; the full ranking of the first state
says how much of the item-level signal the decoder holds before any code is chosen. The users are the
fixed validation subsample of ``evaluation.valid_users`` (or ``--users``); one thread, about 30 s a run
on Amazon Beauty.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import etegrec
from etegrec.metrics import ranking_metrics
from etegrec.training.joint.evaluation import beam_recommend, items_of, validation_subsample
from etegrec.training.run.cache import load_stage_data

SCALES = {  # code-logit scale per level (levels past the list keep the last one)
    "beam search, as evaluated": (1.0,),
    "beam, code logits x 0": (0.0,),
    "beam, code logits at the first level only": (1.0, 0.0),
    "beam, code logits x 0.5": (0.5,),
}


def metrics(items: torch.Tensor, target: np.ndarray) -> str:
    """``N@10 / R@10`` of top-k ``items`` (n, k) against ``target`` (n,)."""
    hit = items.cpu() == torch.as_tensor(target)[:, None]
    ranks = torch.where(hit.any(1), hit.float().argmax(1) + 1, 0).numpy()
    m = ranking_metrics(ranks)
    return f"N@10 {m['ndcg@10']:.4f}  R@10 {m['recall@10']:.4f}"


def in_history(items: torch.Tensor, history: np.ndarray) -> torch.Tensor:
    """(n, k) bool: which of the recommended ``items`` (n, k) are in the row's ``history`` (n, H)."""
    return (items[:, :, None] == torch.as_tensor(history)[:, None, :]).any(2) & (items > 0)


def without_history(run, history: np.ndarray) -> tuple[torch.Tensor, float]:
    """The beam's top 10 (n, 10) once the history's items are dropped from a top 30 of 40 beams (-1 where
    fewer are left), and the share of history items in its plain top 10."""
    cfg = replace(run.config.evaluation, beam_size=max(40, run.config.evaluation.beam_size), top_k=30)
    items = beam_recommend(run.recommender, run.codes, run.trie, history, cfg,
                           renormalize=run.config.recommender.renormalize)[0].cpu()
    seen = in_history(items, history)
    kept = torch.full((len(items), 10), -1, dtype=items.dtype)
    for n, (row, drop) in enumerate(zip(items, seen)):
        left = row[~drop][:10]
        kept[n, :len(left)] = left
    return kept, float(seen[:, :10].float().mean())


def scaled_beam(run, history: np.ndarray, scale: tuple[float, ...]) -> torch.Tensor:
    """The evaluation's beam search with the code logits of level ``t`` times ``scale[t]`` (the last entry for
    levels past the end of ``scale``)."""
    rec, plain = run.recommender, run.recommender._score

    def score(hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        logits = plain(hidden, position)
        factor = [scale[min(t, len(scale) - 1)] for t in range(rec.code_length)]
        if position is None:  # (N, L, K): every level at once
            return logits * logits.new_tensor(factor)[None, :, None]
        return logits * factor[position]

    rec._score = score
    try:
        return beam_recommend(rec, run.codes, run.trie, history, run.config.evaluation,
                              renormalize=run.config.recommender.renormalize)[0]
    finally:
        del rec._score  # back to the class's method


@torch.no_grad()
def first_state_ranking(run, history: np.ndarray, *, mask_history: bool) -> torch.Tensor:
    """Top 10 items (n, 10) of the first decoder state's item scores over the whole catalogue."""
    rec, out = run.recommender, []
    for lo in range(0, len(history), 256):
        h = torch.as_tensor(history[lo:lo + 256])
        any_target = run.codes[torch.ones(len(h), dtype=torch.long)]  # the first state reads no target code
        scores = rec(run.codes[h], h != 0, any_target, items_of(rec, h)).item_logits  # column i: item i + 1
        if mask_history:  # a column per item id, padding (0) included, then padding dropped
            seen = torch.zeros(len(h), scores.shape[1] + 1, dtype=torch.bool).scatter_(1, h, True)[:, 1:]
            scores = scores.masked_fill(seen, float("-inf"))
        out.append(scores.topk(10).indices + 1)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished joint run directories")
    parser.add_argument("--users", type=int, default=None, help="evaluated users (default: evaluation.valid_users)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        run = etegrec.load_run(run_dir)
        if run.recommender.item_output is None:
            raise SystemExit(f"{run_dir}: this run's recommender has no item output vectors (recommender.item_output)")
        history, target = load_stage_data(run.config).split(args.split)
        users = run.config.evaluation.valid_users if args.users is None else args.users
        history, target = validation_subsample(history, target, users)
        print(f"{run_dir} ({len(target)} {args.split} users)")
        for name, scale in SCALES.items():
            print(f"  {name:<47} {metrics(scaled_beam(run, history, scale), target)}")
        kept, share = without_history(run, history)
        print(f"  {'beam, history items dropped':<47} {metrics(kept, target)}  ({share:.1%} of the plain top 10 "
              "were history items)")
        for mask in (False, True):
            name = "first state's item scores" + (", history pushed down" if mask else "")
            print(f"  {name:<47} {metrics(first_state_ranking(run, history, mask_history=mask), target)}")


if __name__ == "__main__":
    main()
