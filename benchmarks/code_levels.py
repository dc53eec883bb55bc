"""Where a joint run loses against its own SASRec stage: choosing an item's first code, or choosing inside it.

    python benchmarks/code_levels.py RUN_DIR [RUN_DIR ...] [--users 2000] [--split valid]

Generative retrieval picks an item code by code: first ``c0`` among all first codes, then ``c1`` among
the codes that follow the chosen ``c0``, and so on. For every level ``p`` and every evaluated user this
ranks the target's code ``c_p`` among the codes that exist after the target's true prefix ``c_<p``, as
scored by

* the run's recommender: its teacher-forced code logits after the true prefix;
* the SASRec stage the run was built on (found in the stage cache of ``$ETEGREC_HOME``): the
  log-sum-exp of its item scores over the items under each candidate code, i.e. the probability
  SASRec gives that code;
* popularity: the training interactions of the items under each candidate code;

and prints MRR, hit@1 / hit@5 and the NLL of the target's code (renormalised over the candidates) per
level, for the recommender and SASRec also by where the target's first code stands in the history, and
how often both levels rank the target's codes near the top together (against independent levels).
Then, on the same users, the items themselves: NDCG@10 of the
recommender's beam search and of SASRec's full ranking, and how popular (training interactions) the items
each puts in its top 10 are, the targets each finds that the other misses, and each model's hit@10 for the
users whose target's first code is the last history item's, another history item's, or new to the history. A level where SASRec beats the recommender is where the
recommender's scores lose items that an ID model finds; a level where SASRec is no better than
popularity is one the collaborative signal cannot resolve (the codes there split items that look the
same to SASRec). The users are the fixed validation subsample of ``evaluation.valid_users`` (or ``--users``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import etegrec
from etegrec.metrics import ranking_metrics
from etegrec.models.sasrec import SASRec
from etegrec.training.embed import EMBED
from etegrec.training.joint.evaluation import beam_recommend, items_of, validation_subsample
from etegrec.training.run.cache import load_stage_data, stage_dir
from etegrec.training.run.checkpoint import read_checkpoint


USERS_AT_ONCE = 2048  # users per (users, groups) block of a level's scores


def group_scores(item_scores: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(n, n_groups) log-sum-exp of ``item_scores`` (n, n_items) over the items of each group."""
    top = item_scores.max(axis=1, keepdims=True)
    mass = np.zeros((len(item_scores), n_groups))
    np.add.at(mass.T, groups, np.exp(item_scores - top).T)
    with np.errstate(divide="ignore"):
        return np.log(mass) + top


def ranks(scores: np.ndarray, target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """1-based rank of column ``target[u]`` among the ``candidates[u]`` columns of ``scores`` (ties: optimistic)."""
    own = scores[np.arange(len(target)), target][:, None]
    return 1 + ((scores > own) & candidates).sum(axis=1)


def nll(scores: np.ndarray, target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """-log of column ``target[u]``'s share of the softmax over the ``candidates[u]`` columns of ``scores``
    (log-scores): the model's code probability given the true prefix, renormalised over the codes that exist."""
    masked = np.where(candidates, scores, -np.inf)
    top = masked.max(axis=1, keepdims=True)
    lse = np.log(np.exp(masked - top).sum(axis=1)) + top[:, 0]
    return lse - scores[np.arange(len(target)), target]


def first_code_places(history_codes: np.ndarray, target_code: np.ndarray) -> dict[str, np.ndarray]:
    """Users split by where the target's first code ``target_code`` (n,) stands in ``history_codes`` (n, H)
    (the history items' first codes, oldest first, left-padded with -1): the last
    item's, another history item's, or none (a cluster the history never visited)."""
    last = history_codes[:, -1] == target_code
    anywhere = (history_codes == target_code[:, None]).any(axis=1)
    return {"the last item's": last, "another history item's": anywhere & ~last, "new to the history": ~anywhere}


def summary(r: np.ndarray, loss: np.ndarray) -> str:
    return (f"MRR {np.mean(1.0 / r):.4f}  hit@1 {np.mean(r == 1):.4f}  hit@5 {np.mean(r <= 5):.4f}  "
            f"NLL {np.mean(loss):.3f}")


def by_place(r: np.ndarray, loss: np.ndarray, places: dict[str, np.ndarray]) -> str:
    """MRR / NLL of the ranks ``r`` and losses ``loss`` (n,) in each group of users of ``places``."""
    return "; ".join(f"{place.split()[0]} {np.mean(1.0 / r[users]):.4f} / {np.mean(loss[users]):.3f}"
                     for place, users in places.items() if users.any())


def both_levels(first: np.ndarray, second: np.ndarray, users: np.ndarray) -> tuple[float, float]:
    """Of ``users``, the share whose target's first code ranks in the top 5 and second code in the top 3
    (ranks ``first``, ``second``), and what that share would be were the two levels independent."""
    a, b = first[users] <= 5, second[users] <= 3
    return float(np.mean(a & b)), float(np.mean(a) * np.mean(b))


@torch.no_grad()
def levels(run_dir: Path, users: int | None, split: str) -> None:
    torch.set_num_threads(1)
    run = etegrec.load_run(run_dir)
    config = run.config
    data = load_stage_data(config)
    # the run's own item ids: data item n + 1 is run item perm[n] + 1
    perm = np.array([run.index_of[raw] - 1 for raw in data.item_map])
    codes = run.codes[1:].cpu().numpy()[perm]  # (n_items, L) codes of data items 1..n
    history, target = data.split(split)
    history, target = validation_subsample(history, target, config.evaluation.valid_users if users is None else users)
    cfg = config.embed
    sasrec = SASRec(n_items=data.n_items, hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                    dropout=cfg.dropout, max_len=data.max_his_len, tied_output=cfg.tied_output,
                    repeat_bias=cfg.repeat_bias)
    embed_dir = stage_dir(config, EMBED, data)
    sasrec.load_state_dict(read_checkpoint(embed_dir / "checkpoints" / "best.pt", stage="embed")["model"])
    sasrec.eval()
    to_run = torch.as_tensor(np.concatenate([[0], perm + 1]))
    sas, gen = [], []
    for lo in range(0, len(target), 256):
        h = torch.as_tensor(history[lo:lo + 256])
        sas.append(sasrec.score(h).log_softmax(-1)[:, 1:].double())
        h_run = to_run[h]
        t_codes = run.codes[to_run[torch.as_tensor(target[lo:lo + 256])]]
        out = run.recommender(run.codes[h_run], h_run != 0, t_codes, items_of(run.recommender, h_run))
        gen.append(out.logits.log_softmax(-1).double())
    sas_scores, gen_logits = torch.cat(sas).numpy(), torch.cat(gen).numpy()  # (n, n_items), (n, L, K)
    _, train_target = data.train_samples()
    popularity = np.log(np.bincount(train_target, minlength=data.n_items + 1)[1:] + 1.0)[None, :]
    first = np.concatenate([[-1], codes[:, 0]])  # data item id -> first code, padding -1
    places = first_code_places(first[history], first[target])
    level_ranks: dict[str, list[np.ndarray]] = {"recommender": [], "SASRec": []}
    print(f"{run_dir} ({len(target)} {split} users)")
    for level in range(codes.shape[1]):
        # groups = distinct prefixes c_<=level; candidates = groups whose c_<level is the target's
        prefixes, group = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
        group = group.reshape(-1)
        parent = np.unique(prefixes[:, :level], axis=0, return_inverse=True)[1].reshape(-1)  # (G,)
        target_group = group[target - 1]
        n_candidates = np.bincount(parent)[parent[target_group]]  # (n,) groups sharing the target's parent
        if n_candidates.mean() <= 1.0:
            break  # nothing left to choose
        print(f"  level {level}: {n_candidates.mean():.1f} candidate codes on average")
        popular = group_scores(popularity, group, len(prefixes))  # (1, G)
        found: dict[str, list[np.ndarray]] = {"recommender": [], "SASRec": [], "popularity": []}
        for lo in range(0, len(target), USERS_AT_ONCE):  # (users, G) blocks: Sports' G is 16k at level 1
            rows = slice(lo, lo + USERS_AT_ONCE)
            candidates = parent[None, :] == parent[target_group[rows]][:, None]  # (u, G)
            # the recommender scores codes: map each group to its code at this level
            for name, scores in (("recommender", gen_logits[rows, level, :][:, prefixes[:, level]]),
                                 ("SASRec", group_scores(sas_scores[rows], group, len(prefixes))),
                                 ("popularity", popular)):
                scores = np.broadcast_to(scores, candidates.shape)
                found[name].append(np.stack([ranks(scores, target_group[rows], candidates),
                                             nll(scores, target_group[rows], candidates)]))
        for name, parts in found.items():
            r, loss = np.concatenate(parts, axis=1)
            print(f"    {name:<12} {summary(r, loss)}")
            if name in level_ranks:
                print(f"    {'':<12} MRR / NLL by the target's first code: {by_place(r, loss, places)}")
                level_ranks[name].append(r)
    new = places["new to the history"]
    if len(level_ranks["SASRec"]) >= 2 and new.any():
        print("  first code in the top 5 and second in the top 3, users whose target's first code is new "
              "(if the levels were independent):")
        for name, (r0, r1, *_) in level_ranks.items():
            both, independent = both_levels(r0, r1, new)
            print(f"    {name:<12} {both:.4f} ({independent:.4f})")
    items(run, sas_scores, to_run, history, target, np.exp(popularity[0]) - 1.0, places)


def items(run, sas_scores: np.ndarray, to_run: torch.Tensor, history: np.ndarray, target: np.ndarray,
          count: np.ndarray, places: dict[str, np.ndarray]) -> None:
    """Item-level top 10 of both models on the same users, the popularity of what each finds, and hit@10
    by where the target's first code stands in the history (``places``: user masks)."""
    found, _ = beam_recommend(run.recommender, run.codes, run.trie, to_run[torch.as_tensor(history)].numpy(),
                              run.config.evaluation, renormalize=run.config.recommender.renormalize)
    from_run = np.zeros(len(to_run), dtype=np.int64)
    from_run[to_run.numpy()] = np.arange(len(to_run))  # run item id -> data item id
    generated = np.where(found.numpy() > 0, from_run[found.clamp_min(0).numpy()], 0)[:, :10]  # (n, 10) data ids
    hit = generated == target[:, None]
    gen_rank = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    sas_rank = 1 + (sas_scores > sas_scores[np.arange(len(target)), target - 1][:, None]).sum(1)
    sas_rank = np.where(sas_rank <= 10, sas_rank, 0)
    sas_top = np.argsort(-sas_scores, axis=1)[:, :10]  # data ids - 1
    print(f"  items: NDCG@10 recommender {ranking_metrics(gen_rank)['ndcg@10']:.4f}, "
          f"SASRec {ranking_metrics(sas_rank)['ndcg@10']:.4f}")
    print(f"    median training interactions of the top 10: recommender "
          f"{np.median(count[generated[generated > 0] - 1]):.0f}, SASRec {np.median(count[sas_top]):.0f}, "
          f"of the targets {np.median(count[target - 1]):.0f}")
    for name, only in (("recommender", (gen_rank > 0) & (sas_rank == 0)), ("SASRec", (sas_rank > 0) & (gen_rank == 0))):
        print(f"    targets in the {name}'s top 10 only: {int(only.sum())}, median training interactions "
              f"{np.median(count[target[only] - 1]) if only.any() else float('nan'):.0f}")
    print("    hit@10 by the target's first code:")
    for place, users in places.items():
        print(f"      {place:<24} {users.mean():6.1%} of users: recommender {np.mean(gen_rank[users] > 0):.4f}, "
              f"SASRec {np.mean(sas_rank[users] > 0):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished joint run directories")
    parser.add_argument("--users", type=int, default=None, help="evaluated users (default: evaluation.valid_users)")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    args = parser.parse_args()
    for run_dir in args.runs:
        levels(run_dir, args.users, args.split)


if __name__ == "__main__":
    main()
