"""How each stage's cost grows with the catalogue: a synthetic catalogue of 1e3 to 1e6 items.

Run: ``python benchmarks/scale.py [--sizes 1e3 1e4 1e5 1e6]``; prints one row per figure with its
value at every size and the log-log slope between neighbouring sizes, and writes
``benchmarks/results/scale.json``. Each size runs in its own process (one thread), so its peak
resident memory is its own.

No public set of a million items is reachable from this project's machine, so the catalogue is
synthetic (:func:`synthetic_catalogue`): N items in N / 100 clusters with clustered embeddings
(``DIM`` wide); U = N users whose sequences (5 + a geometric number of items, mean 14) walk the
clusters: a user stays in the current cluster with probability ``STAY``, else jumps to another
cluster; clusters, and items inside a cluster, are drawn by a Zipf popularity (exponent ``ZIPF``)
or, with probability ``UNIFORM``, uniformly, so that the tail survives the 5-core filter (about
97% of the items do). Users and interactions grow linearly with N (U = N, about 14 N interactions).

The numbers are about growth, not quality: the models are small and untrained (SASRec 64 wide, one
block; RQ-VAE 3 x 256 codes; T5 one layer each side, 64 wide). Per size:

- ``prepare``: the protocol's preparation (5-core, splits, padded histories) of all interactions;
- ``windows``: cutting the SASRec stage's training windows out of every user's sequence;
- ``sasrec_step_{full,sampled}``: one SASRec training step (forward, backward, AdamW), in seconds
  per 1,000 scored targets, and the step's extra resident memory; the full softmax on a batch of
  at most ``FULL_LOGITS`` logits (so 1e6 items run on fewer targets), the sampled one with the
  ``embed.negatives`` default (1,024 items);
- ``rqvae_kmeans``, ``rqvae_epoch``: the tokenizer's k-means initialisation and one epoch over all items;
- ``get_code``: encoding every item, FORGE and the suffixes; ``trie``: building the code trie (and its bytes);
- ``beam_per_1k``: constrained beam search (beam 20, top 10) per 1,000 users;
- ``eval_beam_per_1k``, ``eval_sasrec_per_1k``: evaluation per 1,000 users, beam search and the
  SASRec stage's full ranking (it scores every item for every user);
- ``probe_floors_per_1k``: the joint stage's code floors probe per 1,000 targets;
- ``markov_per_1k``: the first-order Markov baseline, built from all training sequences and scoring
  1,000 users;
- ``checkpoint_bytes``: the three stages' weights as ``torch.save`` writes them; ``peak_rss``.

Timings on a shared machine are upper bounds; the slopes still tell how a cost grows.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULT = Path(__file__).resolve().parent / "results" / "scale.json"
DIM, CLUSTER_SIZE, STAY, UNIFORM, ZIPF = 32, 100, 0.8, 0.9, 1.0
MEAN_EXTRA, MAX_LEN, MIN_COUNT, MAX_HIS_LEN = 9, 60, 5, 20
FULL_LOGITS = 2.5e8  # the full softmax step's batch: at most this many logits (1 GiB of float32)
USERS_MEASURED, SEED = 1000, 0
NEGATIVES = 1024  # the embed.negatives default


def synthetic_catalogue(n_items: int, seed: int = SEED):
    """``(users, items, embeddings)``: interactions in time order per user, and ``[n_items, DIM]``
    clustered item embeddings (row i = item token i). See the module docstring for the walk."""
    rng = np.random.default_rng(seed)
    n_clusters = max(n_items // CLUSTER_SIZE, 1)
    size = n_items // n_clusters  # items n_clusters * size .. n_items - 1 go to the last cluster
    centers = rng.standard_normal((n_clusters, DIM)).astype(np.float32)
    cluster_of = np.minimum(np.arange(n_items) // size, n_clusters - 1)
    embeddings = centers[cluster_of] + 0.3 * rng.standard_normal((n_items, DIM)).astype(np.float32)

    def zipf_cdf(n: int) -> np.ndarray:
        weights = 1.0 / np.arange(1, n + 1) ** ZIPF
        return np.cumsum(weights) / weights.sum()

    cluster_cdf, item_cdf = zipf_cdf(n_clusters), zipf_cdf(size)
    cluster_rank = rng.permutation(n_clusters)  # popularity rank -> cluster, so popular ones are spread

    n_users = n_items
    lengths = np.minimum(5 + rng.geometric(1 / (MEAN_EXTRA + 1), n_users) - 1, MAX_LEN)
    steps = np.zeros((n_users, MAX_LEN), np.int64)

    def draw(cdf: np.ndarray, n: int) -> np.ndarray:  # (n_users,) the uniform share or a Zipf draw
        zipf = np.minimum(np.searchsorted(cdf, rng.random(n_users)), n - 1)
        return np.where(rng.random(n_users) < UNIFORM, rng.integers(0, n, n_users), zipf)

    cluster = cluster_rank[draw(cluster_cdf, n_clusters)]
    for t in range(MAX_LEN):  # one vectorised step of every user's walk
        jump = rng.random(n_users) >= STAY
        cluster = np.where(jump, cluster_rank[draw(cluster_cdf, n_clusters)], cluster)
        inside = draw(item_cdf, size)
        steps[:, t] = np.minimum(cluster * size + inside, n_items - 1)
    real = np.arange(MAX_LEN)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(n_users), lengths)
    return users, steps[real], embeddings


class PeakRSS:
    """The largest resident set size seen while the block runs, above what it was before (bytes)."""

    def __enter__(self) -> PeakRSS:
        self.before = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.before


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - started, out


def measure(n_nominal: int) -> dict:
    """Every figure at one catalogue size (run in its own process)."""
    import torch

    from etegrec.baselines import markov_chain
    from etegrec.data import Interactions, prepare_interactions
    from etegrec.forge import get_code
    from etegrec.metrics import ranking_metrics
    from etegrec.models import RQVAE, SASRec, CodeTrie, T5Recommender, beam_search
    from etegrec.probes import code_floors
    from etegrec.data.windows import make_windows
    from etegrec.training.run.evaluation import evaluate_full_ranking

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    fig: dict = {}
    fig["generate_s"], (users, items, embeddings) = timed(synthetic_catalogue, n_nominal)
    fig["prepare_s"], data = timed(prepare_interactions, Interactions(users, items, None), name=f"synthetic-{n_nominal}",
                                   min_count=MIN_COUNT, max_his_len=MAX_HIS_LEN)
    del users
    n = data.n_items
    stats = data.stats()
    fig.update(items=n, users=stats["users"], interactions=stats["interactions"], train_samples=stats["train_samples"])
    item_emb = torch.zeros(n + 1, DIM)
    item_emb[1:] = torch.from_numpy(embeddings[np.asarray(data.item_map, dtype=np.int64)])
    del embeddings, items

    fig["windows_s"], (windows, counted) = timed(make_windows, data.train_sequences(), MAX_HIS_LEN + 1)
    windows, counted = torch.as_tensor(windows), torch.as_tensor(counted)

    # --- SASRec: one step per loss ---------------------------------------------------------------
    for loss in ("full", "sampled"):
        sasrec = SASRec(n_items=n, hidden=64, n_layers=1, n_heads=2, dropout=0.2, max_len=MAX_HIS_LEN,
                        tied_output=False)
        optimizer = torch.optim.AdamW(sasrec.parameters(), lr=1e-3)
        targets_wanted = 1000 if loss == "sampled" else int(min(1000, FULL_LOGITS / (n + 1)))
        rows = np.flatnonzero(np.cumsum(counted.numpy()) <= targets_wanted)
        batch, batch_counted = windows[rows], counted[rows]
        kwargs = {"negatives": NEGATIVES} if loss == "sampled" else {}
        step(sasrec, optimizer, batch, batch_counted, **kwargs)  # warm-up: Adam's state, allocator
        with PeakRSS() as mem:
            seconds = min(timed(step, sasrec, optimizer, batch, batch_counted, **kwargs)[0] for _ in range(3))
        scored = int(batch_counted.sum())
        fig[f"sasrec_step_{loss}_targets"] = scored
        fig[f"sasrec_step_{loss}_per_1k_s"] = seconds * 1000 / scored
        fig[f"sasrec_step_{loss}_extra_rss"] = mem.extra
    sasrec.eval()
    history, target = data.split("test")
    history, target = history[:USERS_MEASURED], target[:USERS_MEASURED]
    fig["eval_sasrec_per_1k_s"], _ = timed(evaluate_full_ranking, sasrec.score, history, target, batch_size=256)
    fig["eval_sasrec_per_1k_s"] *= 1000 / len(target)

    # --- tokenizer, codes, trie ------------------------------------------------------------------
    rqvae = RQVAE(in_dim=DIM, hidden_dims=[64, 32], e_dim=32, num_layers=3, codebook_size=256, kmeans_init=True)
    fig["rqvae_kmeans_s"], _ = timed(rqvae.kmeans_init_from, item_emb[1:])
    fig["rqvae_epoch_s"], _ = timed(rqvae_epoch, rqvae, item_emb[1:])
    fig["get_code_s"], codes = timed(get_code, rqvae, item_emb, epoch=0)
    codes = codes.codes  # (n + 1, L + 1)
    fig["trie_s"], trie = timed(CodeTrie, codes[1:], code_num=256)
    fig["trie_bytes"] = sum(t.numel() * t.element_size() for t in trie.next_node) + trie.leaf_item.numel() * 8

    # --- beam search and its evaluation ----------------------------------------------------------
    t5 = T5Recommender(code_num=256, code_length=codes.shape[1], num_layers=1, num_decoder_layers=1, d_model=64,
                       d_ff=128, num_heads=2, d_kv=32, latent_dim=32, semantic_dim=DIM,
                       max_history=MAX_HIS_LEN).eval()
    h = torch.as_tensor(history)

    def recommend() -> torch.Tensor:
        return torch.cat([beam_search(t5, codes[h[lo:lo + 250]], h[lo:lo + 250] != 0, trie, beam_size=20,
                                      top_k=10).items for lo in range(0, len(h), 250)])

    fig["beam_per_1k_s"], found = timed(recommend)
    fig["beam_per_1k_s"] *= 1000 / len(h)

    def beam_metrics() -> dict:
        hit = recommend() == torch.as_tensor(target)[:, None]
        return ranking_metrics(torch.where(hit.any(1), hit.float().argmax(1) + 1, 0).numpy())

    fig["eval_beam_per_1k_s"], _ = timed(beam_metrics)
    fig["eval_beam_per_1k_s"] *= 1000 / len(h)

    # --- pure-array parts: the probe and a count baseline ----------------------------------------
    target_counts = np.bincount(data.train_target, minlength=n + 1)[1:]
    fig["probe_floors_per_1k_s"], _ = timed(code_floors, codes[1:].numpy(), target_counts, target)
    fig["probe_floors_per_1k_s"] *= 1000 / len(target)
    def markov() -> None:  # 100 users a batch: a batch's scores are (users, N + 1) float64, 0.8 GB at 1e6
        score = markov_chain(data.train_sequences(), n)
        for lo in range(0, len(history), 100):
            score(history[lo:lo + 100])

    fig["markov_per_1k_s"], _ = timed(markov)
    fig["markov_per_1k_s"] *= 1000 / len(h)

    buffer = io.BytesIO()
    torch.save({"sasrec": sasrec.state_dict(), "rqvae": rqvae.state_dict(), "t5": t5.state_dict()}, buffer)
    fig["checkpoint_bytes"] = buffer.tell()
    fig["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return fig


def step(model, optimizer, windows, counted, **loss_args) -> None:
    optimizer.zero_grad(set_to_none=True)
    model.window_loss(windows, counted, **loss_args).backward()
    optimizer.step()


def rqvae_epoch(model, items, batch_size: int = 1024) -> None:
    import torch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for index in torch.randperm(len(items)).split(batch_size):
        optimizer.zero_grad(set_to_none=True)
        model(items[index]).loss.backward()
        optimizer.step()


# --- the table ---------------------------------------------------------------------------------

ROWS = [  # (key, label, unit)
    ("items", "items after the 5-core", "count"), ("users", "users", "count"),
    ("interactions", "interactions", "count"), ("prepare_s", "data preparation", "s"),
    ("windows_s", "SASRec training windows", "s"),
    ("sasrec_step_full_per_1k_s", "SASRec step, full softmax, per 1k targets", "s"),
    ("sasrec_step_full_extra_rss", "  its extra memory (1k targets; 250 at 1e6)", "bytes"),
    ("sasrec_step_sampled_per_1k_s", "SASRec step, sampled softmax, per 1k targets", "s"),
    ("sasrec_step_sampled_extra_rss", "  its extra memory", "bytes"),
    ("rqvae_kmeans_s", "RQ-VAE k-means init", "s"), ("rqvae_epoch_s", "RQ-VAE epoch", "s"),
    ("get_code_s", "get_code (encode all, FORGE, suffixes)", "s"), ("trie_s", "code trie build", "s"),
    ("trie_bytes", "  its tables", "bytes"), ("beam_per_1k_s", "beam search per 1k users", "s"),
    ("eval_beam_per_1k_s", "evaluation (beam) per 1k users", "s"),
    ("eval_sasrec_per_1k_s", "evaluation (SASRec full ranking) per 1k users", "s"),
    ("probe_floors_per_1k_s", "code floors probe per 1k targets", "s"),
    ("markov_per_1k_s", "Markov baseline, build + 1k users", "s"),
    ("checkpoint_bytes", "checkpoint (SASRec + RQ-VAE + T5)", "bytes"), ("peak_rss", "peak resident memory", "bytes"),
]


def slope(a, b, na, nb):
    if not a or not b or a <= 0 or b <= 0:
        return None
    return math.log(b / a) / math.log(nb / na)


def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2 ** 20:.1f} MiB" if value < 2 ** 30 else f"{value / 2 ** 30:.2f} GiB"
    if unit == "count":
        return f"{value:,}"
    return f"{value:.3g}"


def table(results: dict) -> list[dict]:
    sizes = sorted(results, key=int)
    rows = []
    for key, label, unit in ROWS:
        values = [results[s].get(key) for s in sizes]
        slopes = [slope(values[i], values[i + 1], results[sizes[i]]["items"], results[sizes[i + 1]]["items"])
                  for i in range(len(sizes) - 1)]
        rows.append({"key": key, "label": label, "unit": unit, "values": values, "slopes": slopes})
    return rows


def print_table(results: dict, rows: list[dict]) -> None:
    sizes = sorted(results, key=int)
    head = f"{'figure':<52}" + "".join(f"{'N=' + f'{int(s):.0e}':>12}" for s in sizes)
    head += "".join(f"{'slope ' + str(i + 1):>10}" for i in range(len(sizes) - 1))
    print(head)
    for row in rows:
        line = f"{row['label']:<52}" + "".join(f"{fmt(v, row['unit']):>12}" for v in row["values"])
        line += "".join(f"{'-' if s is None else f'{s:.2f}':>10}" for s in row["slopes"])
        print(line)


def markdown(results: dict, rows: list[dict]) -> str:
    """The table as docs/benchmarks.md shows it."""
    sizes = sorted(results, key=int)
    names = [f"1e{round(math.log10(int(s)))}" for s in sizes]
    lines = ["| figure | " + " | ".join(f"N = {name}" for name in names) + " | " +
             " | ".join(f"slope {names[i]}→{names[i + 1]}" for i in range(len(sizes) - 1)) + " |"]
    lines.append("|---" * (1 + 2 * len(sizes) - 1) + "|")
    for row in rows:
        values = " | ".join(fmt(v, row["unit"]) for v in row["values"])
        slopes = " | ".join("-" if v is None else f"{v:.2f}" for v in row["slopes"])
        lines.append(f"| {row['label'].strip()} | {values} | {slopes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e3, 1e4, 1e5, 1e6], help="nominal item counts")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument("--markdown", action="store_true", help="print the table of --output as Markdown; measure nothing")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # the child process: one size
    parser.add_argument("--into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.into.write_text(json.dumps(measure(int(args.one))))
        return 0
    if args.markdown:
        results = json.loads(args.output.read_text())["sizes"]
        print(markdown(results, table(results)))
        return 0
    results = {}
    # the children import the etegrec of this script's tree, whatever the environment has installed
    tree = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p))
    for size in args.sizes:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            started = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--one", str(size), "--into", out.name], check=True, env=env)
            results[str(int(size))] = json.loads(Path(out.name).read_text())
            results[str(int(size))]["wall_s"] = time.perf_counter() - started
            print(f"N={int(size):.0e}: {results[str(int(size))]['wall_s']:.0f} s", file=sys.stderr, flush=True)
    rows = table(results)
    print_table(results, rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "sizes": results, "table": rows, "threads": 1, "seed": SEED,
        "generator": {"dim": DIM, "cluster_size": CLUSTER_SIZE, "stay": STAY, "uniform": UNIFORM, "zipf": ZIPF,
                      "mean_length": 5 + MEAN_EXTRA, "max_length": MAX_LEN, "min_count": MIN_COUNT,
                      "users_per_item": 1, "max_his_len": MAX_HIS_LEN},
        "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
