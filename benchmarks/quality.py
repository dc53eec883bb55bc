"""Quality under docs/protocol.md: test Recall@5/10 and NDCG@5/10 on one dataset, mean and std over seeds.

    python benchmarks/quality.py [--dataset ml-100k] [--data-path FILE] [--config ml-100k]
                                 [--seeds 2024 2025 2026] [--jobs 2] [--threads 1]
                                 [--runs runs/quality] [--repeats 1] [--pool EARLIER.json ...]
                                 [--models pop markov cooccurrence sasrec sasrec_repeat_bias tiger etegrec_noforge etegrec]

``--jobs 1 --threads 0`` runs each command alone on every core, as the README's command does (the
README's table); the default, two one-thread jobs at a time, is faster in all but gives other
figures for a run (float sums in another order).

Models (same split, same evaluation code):

* ``pop``: items ranked by their number of training interactions (no seed involved).
* ``markov``: first-order Markov chain: how often each item followed the history's last item in the
  training sequences, equal counts by popularity (``etegrec.baselines``; no seed involved).
* ``cooccurrence``: what followed the 10 most recent history items within 10 positions, weighted by
  1 / gap and a recency decay chosen on validation (``etegrec.baselines``; no seed involved).
* ``sasrec``: the project's SASRec stage (the item-embedding stage of that seed's pipeline).
* ``sasrec_repeat_bias``: the SASRec stage with its learned repeat bias (``embed.repeat_bias=true``),
  run on its own (``python -m etegrec.training.embed``).
* ``tiger``: TIGER-style ablation: the pretrained tokenizer's codes stay fixed, the recommender
  alone is trained on the code loss (``joint.train_tokenizer=false``, no alignment losses).
* ``etegrec_noforge``: ETEGRec without FORGE rebalancing (``codes.use_forge=false``).
* ``etegrec``: the default pipeline.

Every run is a command (``python -m etegrec.training.joint ...`` or ``.embed``) with its own run directory
under ``--runs``; a finished run (its ``metrics.json``) is not run again and a stopped one is
resumed, so the benchmark can be stopped and restarted. Prints the table and writes
``benchmarks/results/quality.json``.

With ``run.deterministic`` on (the default since 2026-12-05) a rerun of the same command and seed on
the same machine and thread count repeats its numbers to the last digit, so the spread between runs
is the spread between seeds: add seeds. Before it, two runs of one command on two threads differed by
several thousandths of NDCG@10 (float sums in another order), about as much as two models may
differ; ``--repeats K`` measured that: it runs every trained model K times per seed, and is refused
unless ``--set run.deterministic=false`` lets the runs differ (``<model>-<seed>``, then
``<model>-<seed>-rep2`` ...). ``--pool FILE`` adds the
per-seed values of an earlier results file as one more run of each model and seed it holds (a file
whose runs used another config than this invocation's, key by key, is refused). A seed's
value is then the mean of its runs; ``std`` is still over seeds, and ``run_std`` (the pooled std of
runs within a seed) says how far one run is from another. With ``tiger`` and ``etegrec`` both in the
table, ``gap`` compares them: the difference of the means, the pooled std over seeds
(``sqrt((std_a^2 + std_b^2) / 2)``) and the difference per seed. ``seconds`` holds each run's wall
time: every attempt of its own stage summed (the cached SASRec and tokenizer stages it reused are
not in it; their own event logs under ``$ETEGREC_HOME/stages`` hold theirs).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from etegrec.config import ConfigError
from etegrec.training.embed import EMBED

RESULTS = Path(__file__).parent / "results"
METRICS = ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
VARIANTS = {  # model: (stage, overrides); the first joint one listed in --models builds each seed's stages
    "tiger": ("joint", ["joint.train_tokenizer=false", "losses.rec_kl_weight=0", "losses.rec_dec_cl_weight=0"]),
    "etegrec_noforge": ("joint", ["codes.use_forge=false"]),
    "etegrec": ("joint", []),
    "sasrec_repeat_bias": ("embed", ["embed.repeat_bias=true"]),
}
def _row(r5: float, n5: float, r10: float, n10: float) -> dict[str, float]:
    return {"recall@5": r5, "ndcg@5": n5, "recall@10": r10, "ndcg@10": n10}


# Figures measured elsewhere under the same protocol (docs/protocol.md), printed beside ours and
# marked as published: ml-100k's by RecBole 1.2.1 and a plain PyTorch SASRec (single runs); the
# Amazon sets' from the papers and the 2026 reproductions (GenRec, Cornac publish NDCG@10 only).
ANCHORS = {
    "ml-100k": {
        "Pop (RecBole)": _row(0.0541, 0.0335, 0.0838, 0.0430),
        "SASRec (RecBole, seed 2020)": _row(0.0689, 0.0400, 0.1145, 0.0548),
        "SASRec (RecBole, seed 2021)": _row(0.0742, 0.0452, 0.1442, 0.0673),
        "SASRec (plain PyTorch, best)": _row(0.0997, 0.0703, 0.1591, 0.0895),
    },
    "amazon-beauty": {
        "TIGER (TIGER paper, NeurIPS 2023)": _row(0.0454, 0.0321, 0.0648, 0.0384),
        "SASRec (TIGER paper)": _row(0.0387, 0.0249, 0.0605, 0.0318),
        "LETTER-TIGER (LETTER paper)": _row(0.0431, 0.0286, 0.0672, 0.0364),
        "TIGER (GenRec library, 2026)": {"ndcg@10": 0.0354},
        "SASRec CE (GenRec library)": {"ndcg@10": 0.0421},
        "HSTU CE (GenRec library)": {"ndcg@10": 0.0441},
        "TIGER (Cornac, 2026)": {"ndcg@10": 0.0338},
        "tuned SASRec (Cornac)": {"ndcg@10": 0.0423},
    },
    "amazon-sports": {
        "TIGER (TIGER paper, NeurIPS 2023)": _row(0.0264, 0.0181, 0.0400, 0.0225),
        "SASRec (TIGER paper)": _row(0.0233, 0.0154, 0.0350, 0.0192),
        "TIGER (GenRec library, 2026)": {"ndcg@10": 0.0195},
        "SASRec CE (GenRec library)": {"ndcg@10": 0.0248},
        "HSTU CE (GenRec library)": {"ndcg@10": 0.0232},
    },
    "amazon-instruments": {},  # LETTER's Instruments figures use another split; none under this protocol
}


def popularity(config_name: str, overrides: list[str]) -> dict[str, float]:
    """Test metrics of ranking every item by its count in the training sequences."""
    import torch

    from etegrec.config import load_config
    from etegrec.training.run.evaluation import evaluate_full_ranking
    from etegrec.training.run.cache import load_stage_data

    data = load_stage_data(load_config(config_name, overrides))
    counts = np.bincount(np.concatenate(data.train_sequences()), minlength=data.n_items + 1).astype(np.float32)
    scores = torch.as_tensor(counts)
    scores[0] = float("-inf")
    history, target = data.split("test")
    return evaluate_full_ranking(lambda h: scores.expand(len(h), -1), history, target)


def count_baseline(name: str, config_name: str, overrides: list[str]) -> dict[str, float]:
    """Test metrics of a count baseline of ``etegrec.baselines`` (``markov`` or ``cooccurrence``).

    The co-occurrence model's recency decay is chosen on validation NDCG@10 (model selection as
    for every other model); its test metrics are those of that decay.
    """
    import torch

    from etegrec.baselines import cooccurrence, markov_chain
    from etegrec.config import load_config
    from etegrec.training.run.evaluation import evaluate_full_ranking
    from etegrec.training.run.cache import load_stage_data

    data = load_stage_data(load_config(config_name, overrides))
    sequences = data.train_sequences()

    def evaluate(scorer, split):
        return evaluate_full_ranking(lambda h: torch.as_tensor(scorer(h.numpy())), *data.split(split))

    if name == "markov":
        return evaluate(markov_chain(sequences, data.n_items), "test")
    scorers = {decay: cooccurrence(sequences, data.n_items, decay=decay) for decay in COOCCURRENCE_DECAYS}
    best = max(scorers, key=lambda decay: evaluate(scorers[decay], "valid")["ndcg@10"])
    return {**evaluate(scorers[best], "test"), "decay": best}


COOCCURRENCE_DECAYS = (0.3, 0.5, 0.7, 0.9)


def stage_run(stage: str, run_dir: Path, seed: int, config: str, overrides: list[str], threads: int) -> dict:
    """Run (or resume, or reuse) one ``python -m etegrec.training.<stage>`` run; its metrics.json."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.exists():
        cmd = [sys.executable, "-m", f"etegrec.training.{stage}", "--config", config, "--seed", str(seed),
               "--output-dir", str(run_dir), "--wandb-mode", "offline", "--set", f"run.num_threads={threads}"]
        for item in overrides:
            cmd += ["--set", item]
        if (run_dir / "checkpoints" / "last.pt").exists():
            cmd.append("--resume")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.parent / f"{run_dir.name}.log"
        with open(log_path, "a") as log:
            print(f"running {run_dir.name}: {' '.join(cmd[1:])}", flush=True)
            returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "WANDB_SILENT": "true"}).returncode
        if returncode in (130, -signal.SIGINT):
            raise SystemExit(f"{run_dir.name} was stopped (Ctrl-C): the same command resumes it from its last "
                             f"checkpoint; its log is {log_path}")
        if returncode:
            raise SystemExit(f"{run_dir.name} failed (exit status {returncode}): its log {log_path} says why; once "
                             "that is mended, the same command resumes the unfinished runs")
    return json.loads(metrics_path.read_text())


def sasrec_metrics(seed: int, config: str, overrides: list[str]) -> dict[str, float]:
    """The test metrics of the SASRec stage cached for this seed (built by the joint runs)."""
    from etegrec.config import load_config
    from etegrec.training.run.cache import load_stage_data, stage_dir

    cfg = load_config(config, [*overrides, f"run.seed={seed}"])
    return json.loads((stage_dir(cfg, EMBED, load_stage_data(cfg)) / "metrics.json").read_text())["test"]


def run_seconds(directory: Path) -> float | None:
    """The wall time of the run in ``directory``: the ``seconds`` of every attempt's ``run_finished`` in its
    event log summed (a stopped and resumed run has one per attempt; an attempt killed before it could send
    one is not counted); None when the log holds none."""
    log = directory / "events.jsonl"
    if not log.exists():
        return None
    attempts = [record["seconds"] for line in log.read_text().splitlines() if '"run_finished"' in line
                for record in [json.loads(line)] if record.get("signal") == "run_finished" and "seconds" in record]
    return sum(attempts) if attempts else None


def run_dir(root: Path, model: str, seed: int, repeat: int) -> Path:
    """A run's directory: the first repetition keeps the plain ``<model>-<seed>`` name."""
    return root / (f"{model}-{seed}" if repeat == 1 else f"{model}-{seed}-rep{repeat}")


def spread(values: list[float]) -> float:
    """Sample std, 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: dict[str, dict[int, list[dict[str, float]]]]) -> dict[str, dict]:
    """Per model: each metric's mean and std over seeds of the per-seed means of the runs.

    ``per_seed[model][seed]`` is the list of that seed's runs (their test metrics). ``values`` are the
    per-seed means; with more than one run for some seed the row also holds every run (``runs``) and
    ``run_std``, the pooled within-seed std (the root of the mean within-seed variance)."""
    table = {}
    for model, seeds in per_seed.items():
        seeds = {s: runs for s, runs in seeds.items() if runs}
        if not seeds:
            continue
        row = {"seeds": sorted(seeds), "runs_per_seed": [len(seeds[s]) for s in sorted(seeds)]}
        for m in METRICS:
            runs = [[run[m] for run in seeds[s]] for s in sorted(seeds)]
            values = [statistics.fmean(r) for r in runs]
            row[m] = {"mean": statistics.fmean(values), "std": spread(values), "values": values}
            repeated = [r for r in runs if len(r) > 1]
            if repeated:
                row[m]["runs"] = runs
                row[m]["run_std"] = statistics.fmean(statistics.variance(r) for r in repeated) ** 0.5
        table[model] = row
    return table


def gap(table: dict[str, dict], model: str = "etegrec", baseline: str = "tiger", metric: str = "ndcg@10") -> dict | None:
    """``model`` against ``baseline`` on the seeds both have: difference of the means, pooled std over
    seeds and the difference per seed (``None`` when either is missing)."""
    if model not in table or baseline not in table:
        return None
    a, b = table[model], table[baseline]
    common = sorted(set(a["seeds"]) & set(b["seeds"]))
    if not common:
        return None
    va = [a[metric]["values"][a["seeds"].index(s)] for s in common]
    vb = [b[metric]["values"][b["seeds"].index(s)] for s in common]
    return {"metric": metric, "model": model, "baseline": baseline, "seeds": common,
            "difference": statistics.fmean(va) - statistics.fmean(vb),
            "pooled_std": ((spread(va) ** 2 + spread(vb) ** 2) / 2) ** 0.5,
            "per_seed": [x - y for x, y in zip(va, vb)]}


def resolved_configs(config_name: str, overrides: list[str], models: list[str]) -> dict[str, dict]:
    """Per trained model: the config its runs use (the run section aside: seed and threads vary by run),
    flattened to ``section.key``; written to the results file so that pooling can check it."""
    from etegrec.config import load_config

    out = {}
    for model in models:
        try:
            config = load_config(config_name, [*overrides, *VARIANTS[model][1]]).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"--models {model}: {exc}") from None
        out[model] = {f"{section}.{key}": value for section, values in config.items() if section != "run"
                      for key, value in values.items()}
    return json.loads(json.dumps(out))  # as the results file holds it (tuples as lists)


def check_pool(path: Path, expected: dict[str, dict]) -> str | None:
    """Why ``path``'s runs cannot be pooled with this invocation's (a model's config differs; the keys named),
    or None. A key the file does not hold was added later and is not compared; a file that records no
    configs (written before they were recorded) is pooled as it is, and said so."""
    recorded = json.loads(Path(path).read_text()).get("resolved")
    if recorded is None:
        print(f"--pool {path}: the file records no configs (written before they were recorded); its runs are "
              "pooled as they are", flush=True)
        return None
    for model, config in expected.items():
        differ = [k for k, v in (recorded.get(model) or {}).items() if k in config and config[k] != v]
        if differ:
            shown = ", ".join(f"{k}={recorded[model][k]!r} (now {config[k]!r})" for k in differ[:4])
            return (f"--pool {path}: its {model} runs used another config: {shown}"
                    + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
                    + "; pool only results of the same config")
    return None


def pooled_runs(path: Path, models: list[str], seeds: list[int]) -> dict[tuple[str, int], dict[str, float]]:
    """An earlier results file's per-seed test metrics, as one run per (model, seed) it holds."""
    earlier = json.loads(Path(path).read_text())["models"]
    runs = {}
    for model in models:
        row = earlier.get(model)
        for seed in seeds if row else ():
            if seed in row["seeds"]:
                i = row["seeds"].index(seed)
                runs[(model, seed)] = {m: row[m]["values"][i] for m in METRICS if m in row}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--models", nargs="+", default=["pop", "markov", "cooccurrence", "sasrec", "sasrec_repeat_bias", "tiger", "etegrec",
                                                        "etegrec_noforge"])
    parser.add_argument("--jobs", type=int, default=2, help="joint runs at a time (one thread each by default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--config", help="named config or YAML file (default ml-100k; amazon for --dataset amazon-*)")
    parser.add_argument("--dataset", help="dataset name (default: the config's); picks the published rows shown")
    parser.add_argument("--data-path", help="interaction file to read instead of the named dataset's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run")
    parser.add_argument("--runs", help="where the run directories go (default runs/quality, or "
                                       "runs/quality-<dataset> on another dataset than ml-100k)")
    parser.add_argument("--output", help="results file (default benchmarks/results/quality.json, or "
                                         "quality-<dataset>.json on another dataset than ml-100k)")
    parser.add_argument("--summarise-only", action="store_true",
                        help="run nothing: summarise the finished runs under --runs (missing ones are listed)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per trained model and seed")
    parser.add_argument("--pool", action="append", default=[], metavar="FILE",
                        help="an earlier results file whose per-seed values count as one more run each")
    args = parser.parse_args()

    args.overrides = [*([f"data.dataset={args.dataset}"] if args.dataset else []),
                      *([f"data.data_path={args.data_path}"] if args.data_path else []), *args.overrides]
    from etegrec.config import load_config
    from etegrec.data import DATASETS
    args.config = args.config or (DATASETS[args.dataset].config if args.dataset in DATASETS else "ml-100k")
    trained = [m for m in args.models if m in VARIANTS]
    try:  # each model's runs add their own keys to --set (the ablation's tokenizer is off): a --set that only
        # the ablation can run (codes.file) is checked with them, for each model that will run it
        resolved = resolved_configs(args.config, args.overrides, trained)
        config = load_config(args.config, [*args.overrides, *(VARIANTS[trained[0]][1] if trained else [])])
    except ConfigError as exc:
        parser.error(str(exc))
    dataset = config.data.dataset
    suffix = "" if dataset == "ml-100k" else f"-{dataset}"
    root = Path(args.runs or f"runs/quality{suffix}")
    args.output = args.output or str(RESULTS / f"quality{suffix}.json")
    joint_models = [m for m in args.models if m in VARIANTS and VARIANTS[m][0] == "joint"]
    if "sasrec" in args.models and not joint_models:
        joint_models = ["etegrec"]  # the SASRec stage is built by a pipeline run
    other_models = [m for m in args.models if m in VARIANTS and VARIANTS[m][0] != "joint"]

    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, not {args.repeats}")
    if args.repeats > 1 and not args.summarise_only and config.run.deterministic:
        parser.error(f"--repeats {args.repeats} would train the same numbers {args.repeats} times: run.deterministic "
                     "is on, so a rerun on this machine and thread count repeats its run to the last digit; add "
                     "--seeds instead, or --set run.deterministic=false to measure how far the thread order moves a run")
    for path in args.pool:
        if not Path(path).is_file():
            parser.error(f"--pool: no results file at {path}")
        reason = check_pool(Path(path), resolved)
        if reason:
            parser.error(reason)

    def run(job):
        model, seed, repeat = job
        stage, overrides = VARIANTS[model]
        return job, stage_run(stage, run_dir(root, model, seed, repeat), seed, args.config,
                              [*args.overrides, *overrides], args.threads)

    # a seed's first run builds its cached embedding and tokenizer stages, which its other runs reuse:
    # the first runs of all seeds go first (different seeds never share a stage), then the others
    first = [(joint_models[0], s, 1) for s in args.seeds] if joint_models else []
    rest = [(m, s, r) for r in range(1, args.repeats + 1) for m in [*joint_models, *other_models] for s in args.seeds
            if (m, s, r) not in first]  # repetition by repetition, model by model
    if args.summarise_only:
        done = {job: json.loads((run_dir(root, *job) / "metrics.json").read_text())
                for job in first + rest if (run_dir(root, *job) / "metrics.json").exists()}
        missing = [run_dir(root, *job).name for job in first + rest if job not in done]
        if not root.exists():
            print(f"no runs under {root}: only the --pool files are summarised" if args.pool else f"no runs under {root}")
        elif missing:
            print(f"not finished (left out): {', '.join(missing)}")
    else:
        try:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                done = dict(pool.map(run, first))
                done.update(pool.map(run, rest))
        except KeyboardInterrupt:  # the runs got the Ctrl-C too and stop at their last checkpoint
            raise SystemExit(f"stopped (Ctrl-C); the same command resumes the unfinished runs under {root}") from None
    pooled = [pooled_runs(path, list(VARIANTS), args.seeds) for path in args.pool]
    per_seed: dict[str, dict[int, list[dict[str, float]]]] = {}
    if "pop" in args.models:
        pop = popularity(args.config, args.overrides)
        per_seed["pop"] = {s: [pop] for s in args.seeds}
    for name in ("markov", "cooccurrence"):
        if name in args.models:
            metrics = count_baseline(name, args.config, args.overrides)
            per_seed[name] = {s: [metrics] for s in args.seeds}
    if "sasrec" in args.models:
        per_seed["sasrec"] = {s: [sasrec_metrics(s, args.config, args.overrides)] for s in args.seeds}
    for model in (m for m in args.models if m in VARIANTS):
        per_seed[model] = {s: [done[(model, s, r)]["test"] for r in range(1, args.repeats + 1) if (model, s, r) in done]
                              + [earlier[(model, s)] for earlier in pooled if (model, s) in earlier]
                           for s in args.seeds}

    table = summarise(per_seed)
    comparison = gap(table)
    seconds = {model: {str(s): [run_seconds(run_dir(root, model, s, r)) for r in range(1, args.repeats + 1)
                                if (model, s, r) in done] for s in args.seeds}
               for model in args.models if model in VARIANTS}
    print(f"{dataset} test metrics, mean ± std over seeds {args.seeds} ({args.config} config)")
    print(f"{'model (runs per seed)':<46}" + "".join(f"{m:>18}" for m in METRICS) + "   run-to-run std")
    for model, row in table.items():
        name = f"{model} ({'/'.join(map(str, row['runs_per_seed']))})"
        spread = f"   {row['ndcg@10']['run_std']:.4f}" if "run_std" in row["ndcg@10"] else ""
        print(f"{name:<46}" + "".join(f"{row[m]['mean']:>10.4f} ± {row[m]['std']:.4f}" for m in METRICS) + spread)
    anchors = ANCHORS.get(dataset, {})
    for name, anchor in anchors.items():
        print(f"{'published: ' + name:<46}" + "".join(f"{anchor[m]:>10.4f}        " if m in anchor else f"{'-':>10}        "
                                                      for m in METRICS))
    if comparison:
        print(f"{comparison['model']} - {comparison['baseline']}, test {comparison['metric']}: "
              f"{comparison['difference']:+.4f} (pooled std over seeds {comparison['pooled_std']:.4f}; per seed "
              + " / ".join(f"{d:+.4f}" for d in comparison["per_seed"]) + ")")
    timed = [f"{model}-{s} {t:,.0f} s" for model, by_seed in seconds.items() for s, runs in by_seed.items()
             for t in runs if t is not None]
    if timed:
        print("each run's own stage, every attempt summed (cached earlier stages not counted): " + ", ".join(timed))
    if not table:  # a --summarise-only before any run finished: an empty table must not replace a results file
        print(f"nothing measured: {args.output} not written")
        return
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"dataset": dataset, "config": args.config, "overrides": args.overrides, "seeds": args.seeds,
                                             "repeats": args.repeats, "pooled": args.pool, "models": table, "resolved": resolved,
                                             "seconds": seconds, "gap": comparison, "published": anchors}, indent=2))


if __name__ == "__main__":
    main()
