"""Two joint runs compared user by user: the paired difference of their per-user NDCG@10 and its standard error.

    python benchmarks/paired_users.py A_RUN B_RUN [A_RUN B_RUN ...]

Means over seeds say whether two models differ by more than the seeds' spread. Runs of two models on the
same seed also score the same users, and the users say more: each run's best checkpoint recommends for
every validation and test user through ``etegrec.load_run`` (the evaluation's beam search, so a run's test
figure here is its own), and for each pair this prints, A minus B, the mean per-user NDCG@10 difference
with its paired standard error on

* the validation users that model selection scores (``evaluation.valid_users``: one draw for every run
  and seed on a dataset; where the two runs drew differently, the users either scored),
* the other validation users (none where a run selected on every validation user),
* every test user,

and the correlation of the two runs' per-user test NDCG@10. With several pairs on one dataset, one more
line averages each test user's difference over the pairs. The data is the prepared dataset of each run's
config, from ``$ETEGREC_HOME``. One thread; about two minutes per run and split on Amazon Beauty (a pair: 8.5 min).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import etegrec
from etegrec.metrics import user_ndcg
from etegrec.training.joint.evaluation import validation_subsample
from etegrec.training.run.cache import load_stage_data


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` over users and its standard error."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))


def scored(run_dir: Path) -> dict[str, np.ndarray]:
    """Per-user NDCG@10 of the run's best checkpoint on every ``valid`` and ``test`` user, and ``fixed``:
    the mask of the validation users model selection scored."""
    run = etegrec.load_run(run_dir)
    data = load_stage_data(run.config)
    out = {}
    for split in ("valid", "test"):
        history, target = data.split(split)
        raw = [[data.item_map[i - 1] for i in row if i > 0] for row in history]
        wanted = [data.item_map[t - 1] for t in target]
        ranks = [next((r + 1 for r, (item, _) in enumerate(recs) if item == want), 0)
                 for recs, want in zip(run.recommend(raw, k=10), wanted)]
        out[split] = user_ndcg(np.array(ranks))
    n = len(out["valid"])
    fixed = np.zeros(n, dtype=bool)
    fixed[validation_subsample(np.zeros((n, 1)), np.arange(n), run.config.evaluation.valid_users)[1]] = True
    out["fixed"] = fixed
    return out


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """A minus B (mean, standard error) on the validation users model selection scored in either run, on the
    other validation users (none when either run selected on every user: ``evaluation.valid_users=0``) and on
    every test user."""
    if len(a["test"]) != len(b["test"]) or len(a["valid"]) != len(b["valid"]):
        raise SystemExit("the two runs of a pair were evaluated on other users (another dataset)")
    selection = a["fixed"] | b["fixed"]
    result = {"valid, selection users": paired(a["valid"][selection], b["valid"][selection])}
    if not selection.all():
        result["valid, other users"] = paired(a["valid"][~selection], b["valid"][~selection])
    result["test, every user"] = paired(a["test"], b["test"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished joint run directories, A B per pair")
    args = parser.parse_args()
    if len(args.runs) % 2:
        parser.error(f"runs come in pairs (A B); got {len(args.runs)}")
    torch.set_num_threads(1)
    differences = []
    for a_dir, b_dir in zip(args.runs[::2], args.runs[1::2]):
        a, b = scored(a_dir), scored(b_dir)
        result = compare(a, b)
        print(f"{a_dir.name} - {b_dir.name}: test N@10 {a['test'].mean():.4f} - {b['test'].mean():.4f}; "
              + "; ".join(f"{name} {mean:+.4f} (se {se:.4f})" for name, (mean, se) in result.items())
              + f"; per-user test correlation {np.corrcoef(a['test'], b['test'])[0, 1]:.2f}", flush=True)
        differences.append(a["test"] - b["test"])
    if len(differences) > 1 and len({len(d) for d in differences}) == 1:
        mean, se = paired(np.mean(differences, axis=0), np.zeros(len(differences[0])))
        print(f"each test user's difference averaged over the {len(differences)} pairs: {mean:+.4f} (se {se:.4f}, "
              f"{len(differences[0])} users)")


if __name__ == "__main__":
    main()
