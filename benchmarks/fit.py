"""Fit diagnostics of finished runs: is a model under- or over-fitting, and is the test target harder?

    python benchmarks/fit.py RUN_DIR [RUN_DIR ...] [--threads 1]

RUN_DIR is a finished joint run (``python -m etegrec.training.joint``) or embed run (the SASRec
stage, e.g. a cached ``$ETEGREC_HOME/stages/embed-*`` folder). Its best checkpoint is evaluated,
with the evaluation code of its stage, on four sets of one sample per user (items = the user's
chronological items):

* ``train (last)``: history ``items[:-3]``, target ``items[-3]``: a sample it was trained on;
* ``valid``: history ``items[:-2]``, target ``items[-2]`` (the validation split);
* ``test``: history ``items[:-1]``, target ``items[-1]`` (the test split);
* ``test from valid history``: history ``items[:-2]``, target ``items[-1]``.

A model that scores no better on ``train (last)`` than on ``valid`` has not fitted its training
data (underfitting); ``valid`` far above ``test`` with ``test from valid history`` as low as
``test`` says the last item itself is harder for the model. Also prints, for SASRec runs, the
share of top-10 slots given to items of the history (ml-100k users never rate an item twice).
Prints a table and writes ``--output`` (default ``fit-<first run>.json`` beside the first run directory;
the committed ``benchmarks/results/fit.json`` only when it is named).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from etegrec.config import run_config
from etegrec.data.prepare import pad_histories
from etegrec.training.run.checkpoint import read_checkpoint
from etegrec.training.run.cache import load_stage_data
from etegrec.training.joint import JOINT

SETS = ["train (last)", "valid", "test", "test from valid history"]


def sample_sets(data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four evaluation sets of the module docstring, as (history, target)."""
    train = data.train_sequences()  # items[:-2] of every user
    valid_history, valid_target = data.split("valid")
    _, test_target = data.split("test")
    return {
        "train (last)": (pad_histories([s[:-1] for s in train], data.max_his_len),
                         np.array([s[-1] for s in train], dtype=np.int64)),
        "valid": (valid_history, valid_target),
        "test": data.split("test"),
        "test from valid history": (valid_history, test_target),
    }


def joint_fit(run_dir: Path, config, data) -> dict:
    from etegrec.training.joint import JointTrainer
    from etegrec.training.run.options import RunOptions
    from etegrec.training.embed import EMBED
    from etegrec.training.run.pipeline import ensure
    from etegrec.training.rqvae import RQVAE
    from etegrec.training.run import Run, prepare_process

    prepare_process(config)  # as the pipeline does, should a missing stage have to be rebuilt here
    with tempfile.TemporaryDirectory() as tmp, Run(config, RunOptions(output_dir=Path(tmp), console=False),
                                                   stage=JOINT) as run:
        embeddings, tokenizer_state = (ensure(stage, config, data, run.accelerator) for stage in (EMBED, RQVAE))
        trainer = JointTrainer(config, run, data, embeddings, tokenizer_state)
        trainer.load_state_dict(read_checkpoint(run_dir / "checkpoints" / "best.pt"))
        return {name: trainer.evaluate_samples(h, t) for name, (h, t) in sample_sets(data).items()}


@torch.no_grad()
def embed_fit(run_dir: Path, config, data) -> dict:
    from etegrec.models import SASRec
    from etegrec.training.run.evaluation import evaluate_full_ranking

    c = config.embed
    model = SASRec(n_items=data.n_items, hidden=c.hidden, n_layers=c.n_layers, n_heads=c.n_heads,
                   dropout=c.dropout, max_len=data.max_his_len, tied_output=c.tied_output,
                   repeat_bias=c.repeat_bias)
    state = read_checkpoint(run_dir / "checkpoints" / "best.pt")
    model.load_state_dict(state["model"])
    model.eval()
    out = {}
    for name, (history, target) in sample_sets(data).items():
        out[name] = evaluate_full_ranking(model.score, history, target)
        h = torch.as_tensor(history)
        top = model.score(h).topk(10).indices  # (n, 10)
        out[name]["history_share@10"] = float((top[:, :, None] == h[:, None, :]).any(-1).float().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the report (default: fit.json beside the first run directory; "
                             "docs/results.md's table is benchmarks/results/fit.json, written only when named here)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {}
    for run_dir in args.runs:
        stage = json.loads((run_dir / "metrics.json").read_text())["stage"]
        config = run_config(run_dir / "config.yaml")
        data = load_stage_data(config)
        fit = joint_fit if stage == "joint" else embed_fit
        report[str(run_dir)] = {"stage": stage, "seed": config.run.seed, "sets": fit(run_dir, config, data)}
    print(f"{'run':<40}{'stage':>7}" + "".join(f"{s:>26}" for s in SETS))
    for run_dir, r in report.items():
        cells = "".join(f"{r['sets'][s]['ndcg@10']:>16.4f} (R {r['sets'][s]['recall@10']:.3f})" for s in SETS)
        print(f"{Path(run_dir).name[-40:]:<40}{r['stage']:>7}{cells}")
        if "history_share@10" in r["sets"]["test"]:
            shares = ", ".join(f"{s} {r['sets'][s]['history_share@10']:.1%}" for s in SETS)
            print(f"{'':<40}top-10 slots on history items: {shares}")
    print("cells: NDCG@10 (Recall@10)")
    output = args.output or args.runs[0].parent / f"fit-{args.runs[0].name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"report: {output}")


if __name__ == "__main__":
    main()
