"""``python -m etegrec.report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page of a run's curves.

    python -m etegrec.report runs/joint-ml-100k-20261201-204700 [more run dirs] [--output report.html]

It reads each run directory's ``events.jsonl``, ``metrics.json`` and ``config.yaml`` only (no W&B),
so it works on a run still going (what is there so far) and on a killed one (a torn last line is
skipped). Runs are overlaid in every figure; figures are matplotlib PNGs embedded in the page.
:func:`figure_series` is the data behind the figures, as plain lists, for tests and other plots.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from etegrec.config import current_keys
from etegrec.hooks.eventlog import read_events

__all__ = ["FIGURES", "RunRecord", "figure_series", "load_run_record", "main", "render_html"]

# figure id -> title; every figure of the page, in order
FIGURES = {
    "losses": "Training losses by phase (epoch means)",
    "lr": "Learning rates",
    "shares": "Each weighted loss part's share of what the tokenizer and the recommender train on",
    "ndcg": "NDCG@10: validation by epoch, test of the best checkpoint",
    "recall": "Recall@10: validation by epoch, test of the best checkpoint",
    "collision": "Collision rate (items sharing all RQ codes)",
    "conflict": "max_conflict after FORGE and before it",
    "changed": "Share of item codes changed at each refresh",
    "utilization": "Codebook utilization per layer",
    "perplexity": "Codebook perplexity per layer",
    "gini": "Codebook Gini per layer",
    "usage": "Last codebook usage histogram per layer",
    "probes": "Learning probes: item NLL against popularity, top-10 overlaps, repeats",
}

Series = list[tuple[str, list[float], list[float]]]  # (label, x, y)


@dataclass
class RunRecord:
    """What a run directory holds for the report."""

    name: str
    events: list[dict[str, Any]]
    metrics: dict[str, Any] | None  # None while the run has not finished
    config: dict[str, Any]


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Read a run directory's event log, final metrics (if any) and config.

    Raises:
        FileNotFoundError: no ``events.jsonl`` in it.
        ValueError: a ``metrics.json`` or ``config.yaml`` that does not parse to a mapping (torn or
            edited), named.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "events.jsonl").exists():
        raise FileNotFoundError(f"{str(run_dir / 'events.jsonl')!r} does not exist: pass a run directory")
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.yaml"
    metrics = _mapping(metrics_path, json.loads, "JSON") if metrics_path.exists() else None
    config = _mapping(config_path, yaml.safe_load, "YAML") if config_path.exists() else {}
    for section, values in (config or {}).items():  # a file cut inside its first key still parses
        if not isinstance(values, dict):
            raise ValueError(f"{str(config_path)!r} holds a section {section!r} that is a {type(values).__name__}, "
                             "not the mapping a run writes; restore it, or leave that run out of the report")
    # keys under their current names: a run written before a key moved compares with newer runs
    return RunRecord(run_dir.name, read_events(run_dir / "events.jsonl"), metrics, current_keys(config or {}))


def _mapping(path: Path, parse: Callable[[str], Any], kind: str) -> dict[str, Any] | None:
    """``path`` parsed, once it is a mapping (or empty: None)."""
    try:
        value = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(exc).splitlines()[0]
        raise ValueError(f"{str(path)!r} is not valid {kind} ({reason}); it is torn or was edited: restore it, "
                         "or leave that run out of the report") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a {type(value).__name__}, not the mapping a run writes; restore it, "
                         "or leave that run out of the report")
    return value


def _of(run: RunRecord, signal: str) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("signal") == signal]


def figure_series(run: RunRecord) -> dict[str, dict[str, Series]]:
    """Per figure id, per panel: the (label, epochs, values) lines of one run (see :data:`FIGURES`)."""
    out: dict[str, dict[str, Series]] = {key: {} for key in FIGURES}
    for e in _of(run, "epoch_end"):
        for part, value in e["losses"].items():
            _add(out["losses"], e["phase"], part, e["epoch"], value)
        for name, value in (e.get("lr") or {}).items():
            _add(out["lr"], "learning rate", name, e["epoch"], value)
    _shares(run, out["shares"])
    test = run.metrics.get("test") if run.metrics else None
    for metric, key in (("ndcg@10", "ndcg"), ("recall@10", "recall")):
        for e in _of(run, "evaluated"):
            _add(out[key], metric, e["split"], e["epoch"], e["metrics"].get(metric, float("nan")))
        if test and not any(e["split"] == "test" for e in _of(run, "evaluated")):
            _add(out[key], metric, "test", run.metrics.get("best_epoch", 0), test.get(metric, float("nan")))
    for e in _of(run, "codes_assigned"):
        codes = e.get("codes")  # a list, or {"shape": ..., ...} when the event log summarised a large array
        n_items = len(codes) if isinstance(codes, list) else (codes or {}).get("shape", [None])[0]
        _add(out["collision"], "collision rate", "after FORGE", e["epoch"], e["collision_rate"])
        _add(out["conflict"], "max_conflict", "after FORGE", e["epoch"], e["max_conflict"])
        _add(out["conflict"], "max_conflict", "before FORGE", e["epoch"], e["max_conflict_before"])
        if n_items and e["epoch"] > 0:  # the first assignment changes nothing that was learned
            _add(out["changed"], "codes changed", "share", e["epoch"], e["changed"] / n_items)
    for e in _of(run, "codebook_usage"):
        for key in ("utilization", "perplexity", "gini"):
            _add(out[key], key, f"layer {e['layer']}", e["epoch"], e[key])
    last: dict[int, dict[str, Any]] = {}
    for e in _of(run, "codebook_usage"):
        if isinstance(e.get("counts"), list):
            last[e["layer"]] = e
    for layer, e in sorted(last.items()):
        out["usage"][f"layer {layer} (epoch {e['epoch']})"] = [
            ("usage", list(map(float, range(len(e["counts"])))), [float(c) for c in e["counts"]])]
    for e in _of(run, "probed"):
        p = e["probes"]
        for name in ("item_nll", "popularity_nll"):
            _add(out["probes"], "NLL (nats)", name, e["epoch"], p[name])
        for name in ("shuffle_overlap", "drop_last_overlap", "repeat_share", "data_repeat_rate"):
            _add(out["probes"], "shares", name, e["epoch"], p[name])
    return out


# which weighted loss parts train each model: the RQ-VAE loss, the two alignment losses and the usage deficit
# reach the tokenizer; every part but those of the tokenizer alone reaches the recommender
TRAINS = {"tokenizer": ("vq_loss", "kl_loss", "dec_cl_loss", "usage_loss"),
          "recommender": ("code_loss", "item_loss", "kl_loss", "dec_cl_loss")}


def _shares(run: RunRecord, panels: dict[str, Series]) -> None:
    """Per joint epoch, each weighted part's share of the weighted sum that trains each model: the
    tokenizer in its (``id``) epochs, the recommender in the epochs it trains (all but the ``id`` ones
    unless ``joint.id_trains_rec``). A part of weight 0 trains nothing and is left out."""
    id_trains_rec = bool((run.config.get("joint") or {}).get("id_trains_rec", False))
    for e in _of(run, "epoch_end"):
        weights, losses = e.get("weights") or {}, e["losses"]
        weighted = {k: w * losses[k] for k, w in weights.items() if w > 0 and k in losses}
        trained = (["tokenizer"] if e["phase"] == "id" else []) + (
            ["recommender"] if e["phase"] != "id" or id_trains_rec else [])
        for model in trained:
            parts = {k: v for k, v in weighted.items() if k in TRAINS[model]}
            total = sum(parts.values())
            for part, value in parts.items() if total > 0 else ():
                _add(panels, model, part, e["epoch"], value / total)


def _add(panels: dict[str, Series], panel: str, label: str, x: float, y: float) -> None:
    lines = panels.setdefault(panel, [])
    for name, xs, ys in lines:
        if name == label:
            xs.append(float(x))
            ys.append(float(y))
            return
    lines.append((label, [float(x)], [float(y)]))


def _png(key: str, runs: list[RunRecord], data: list[dict[str, dict[str, Series]]]) -> str | None:
    """The figure ``key`` of all runs as a base64 PNG; None when no run has its data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({panel for d in data for panel in d[key]})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, panel in zip(axes[0], panels):
        for i, (run, d) in enumerate(zip(runs, data)):
            for label, xs, ys in d[key].get(panel, []):
                name = label if len(runs) == 1 else f"{run.name}: {label}"
                if key == "usage":
                    ax.step(xs, ys, where="mid", linestyle=styles[i % 4], label=run.name, linewidth=0.8)
                else:
                    ax.plot(xs, ys, linestyle=styles[i % 4], marker="o" if len(xs) < 3 else None, label=name)
        if key == "losses" and all(y > 0 for d in data for _, _, ys in d[key].get(panel, []) for y in ys):
            ax.set_yscale("log")  # the parts differ by orders of magnitude (a KL of ~30, a code loss of ~1.5)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("code" if key == "usage" else "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _tables(runs: list[RunRecord]) -> str:
    names = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    rows = []
    for split in ("valid", "test"):
        keys = sorted({k for r in runs if r.metrics for k in (r.metrics.get(split) or {})})
        for key in keys:
            cells = "".join(f"<td>{(r.metrics or {}).get(split, {}).get(key, float('nan')):.4f}</td>" for r in runs)
            rows.append(f"<tr><th>{split} {html.escape(key)}</th>{cells}</tr>")
    if not rows:
        rows.append(f"<tr><th>final metrics</th>{'<td>not finished</td>' * len(runs)}</tr>")
    flat = [_flat(r.config) for r in runs]
    differing = sorted(k for k in set().union(*flat) if len({repr(f.get(k)) for f in flat}) > 1)
    config_rows = "".join(f"<tr><th>{html.escape(k)}</th>" + "".join(f"<td>{html.escape(repr(f.get(k)))}</td>"
                                                                      for f in flat) + "</tr>" for k in differing)
    return (f"<h2>Final metrics</h2><table><tr><th></th>{names}</tr>{''.join(rows)}</table>"
            f"<h2>Config keys where the runs differ</h2>"
            + (f"<table><tr><th></th>{names}</tr>{config_rows}</table>" if differing
               else "<p>none (one run, or identical configs)</p>"))


def render_html(runs: list[RunRecord]) -> str:
    """The whole page: tables, then every figure of :data:`FIGURES` that has data (a note for the others)."""
    data = [figure_series(r) for r in runs]
    parts = [f"<h1>etegrec report: {html.escape(', '.join(r.name for r in runs))}</h1>", _tables(runs)]
    for key, title in FIGURES.items():
        png = _png(key, runs, data)
        body = (f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png
                else "<p>no data in these runs</p>")
        parts.append(f'<figure id="{key}"><figcaption>{html.escape(title)}</figcaption>{body}</figure>')
    style = ("body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:1em}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right} figure{margin:1.5em 0}"
             "figcaption{font-weight:bold;margin-bottom:.3em} img{max-width:100%}")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>etegrec report</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m etegrec.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (their events.jsonl)")
    parser.add_argument("--output", type=Path, default=Path("report.html"), help="the page to write (report.html)")
    args = parser.parse_args(argv)
    try:
        if not args.output.parent.is_dir():  # before the runs are read and the figures drawn
            raise ValueError(f"--output {str(args.output)!r}: the directory {str(args.output.parent)!r} does not "
                             "exist; create it or write elsewhere")
        runs = [load_run_record(d) for d in args.run_dirs]
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.write_text(render_html(runs), encoding="utf-8")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
