"""Do two checkouts train the same? The pipeline from an empty stage cache, one thread, fixed seed.

Run: ``python benchmarks/same_losses.py BEFORE_TREE AFTER_TREE`` (two checkouts of this repository,
e.g. a ``git worktree`` of the old commit and this one). Each tree runs ``--config tiny`` and the
default ``ml-100k`` config shortened (300 users, 3 SASRec epochs, 100 RQ-VAE epochs, 4 joint and 1
fine-tuning epoch), each in its own ``$ETEGREC_HOME`` (ml-100k's raw file is copied from yours when you
have it), with ``OMP_NUM_THREADS=1``: one thread is bitwise reproducible, two are not (the order of
parallel reductions). Then every payload that carries a loss, a learning rate, a metric, code counts or a
checkpoint of the joint run and of each cached stage is compared; ``epoch_end``'s optimised sum, called
``loss`` before issue 16 and ``loss_total`` since, is compared under its new name. The keys it sets
kept their names when issue 26 split the ``joint`` section, so both trees take the same ``--set``s. Exit
status 0 when everything is identical.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUNS = {"tiny": ["--config", "tiny"],
        "short": ["--set", "run.num_threads=1", "--set", "data.max_users=300", "--set", "embed.epochs=3",
                  "--set", "rqvae.epochs=100", "--set", "joint.epochs=4", "--set", "joint.finetune_epochs=1"]}
KEEP = {"epoch_end": ("stage", "phase", "epoch", "losses", "lr"), "evaluated": ("stage", "split", "epoch", "metrics"),
        "step_end": ("stage", "phase", "epoch", "step", "losses"), "codebook_usage": ("stage", "epoch", "layer", "counts"),
        "codes_assigned": ("epoch", "max_conflict", "changed", "collision_rate"), "probed": ("epoch", "probes"),
        "checkpoint_saved": ("epoch", "is_best"), "run_finished": ("status", "best_metrics")}


def train(tree: Path, root: Path) -> None:
    raw = Path(os.environ.get("ETEGREC_HOME", Path.home() / ".cache" / "etegrec")) / "raw"
    if raw.exists():
        shutil.copytree(raw, root / "home" / "raw")
    env = {**os.environ, "ETEGREC_HOME": str(root / "home"), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    for name, args in RUNS.items():
        done = subprocess.run([sys.executable, "-m", "etegrec.training.joint", *args, "--seed", "7", "--output-dir",
                               str(root / name), "--wandb-mode", "disabled"], cwd=tree, env=env,
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{tree}: the {name} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def records(path: Path) -> list:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        if event["signal"] in KEEP:
            row = {k: event.get(k) for k in KEEP[event["signal"]]}
            if event["signal"] == "epoch_end":
                row["losses"] = {("loss_total" if k == "loss" else k): v for k, v in row["losses"].items()}
            out.append((event["signal"], row))
    return out


def logs(root: Path) -> dict[str, Path]:
    found = {name: root / name / "events.jsonl" for name in RUNS}
    found.update({d.name: d / "events.jsonl" for d in sorted((root / "home" / "stages").glob("*"))})
    return found


def main() -> int:
    before, after = (Path(p).resolve() for p in sys.argv[1:3])
    with tempfile.TemporaryDirectory() as tmp:
        roots = {side: Path(tmp) / side for side in ("before", "after")}
        for side, tree in (("before", before), ("after", after)):
            train(tree, roots[side])
        a, b = logs(roots["before"]), logs(roots["after"])
        same = a.keys() == b.keys()
        for name in sorted(a.keys() | b.keys()):
            x, y = (records(d[name]) if name in d else None for d in (a, b))
            same &= x == y
            print(f"{name:40s} {len(x or []):5d} records  {'identical' if x == y else 'DIFFERENT'}")
    print("identical" if same else "different")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
