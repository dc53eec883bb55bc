"""Cost of one ``epoch_end.send(sender, **payload)``: with nobody listening, and with one trivial receiver.

    python benchmarks/emit.py

Also times the guard senders use before building a costly payload (``if signal.receivers:``).
Prints nanoseconds per emission (best of a few repeats, loop overhead included and also reported
on its own) and writes ``benchmarks/results/emit.json``.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from etegrec import signals

N_SILENT = 1_000_000
N_ONE_RECEIVER = 100_000
REPEATS = 5

PAYLOAD = {"stage": "rec", "phase": "rec", "epoch": 3, "losses": {"total": 0.5, "code": 0.25},
           "lr": {"rec": 1e-3}, "seconds": 12.5, "samples_per_second": 8000.0}


def best_ns_per_call(fn, n: int) -> float:
    """Best (least disturbed) of ``REPEATS`` timings of ``n`` calls, in ns per call."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        fn(n)
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def empty_loop(n: int) -> None:
    sender, payload = object(), PAYLOAD
    for _ in range(n):
        pass


def emit(n: int) -> None:
    sender, payload, send = object(), PAYLOAD, signals.epoch_end.send
    for _ in range(n):
        send(sender, **payload)


def emit_guarded(n: int) -> None:
    sender, payload, sig = object(), PAYLOAD, signals.epoch_end
    for _ in range(n):
        if sig.receivers:
            sig.send(sender, **payload)


def receiver(sender, **payload):
    pass


def main() -> dict:
    assert not signals.epoch_end.receivers, "benchmark needs epoch_end without receivers"
    results = {
        "signal": "epoch_end",
        "payload_keywords": len(PAYLOAD),
        "loop_overhead_ns": round(best_ns_per_call(empty_loop, N_SILENT), 1),
        "no_receiver": {"emissions": N_SILENT, "ns_per_emission": round(best_ns_per_call(emit, N_SILENT), 1)},
        "no_receiver_guarded": {"emissions": N_SILENT,
                                "ns_per_emission": round(best_ns_per_call(emit_guarded, N_SILENT), 1)},
    }
    with signals.epoch_end.connected_to(receiver):
        results["one_receiver"] = {"emissions": N_ONE_RECEIVER,
                                   "ns_per_emission": round(best_ns_per_call(emit, N_ONE_RECEIVER), 1)}
    results["environment"] = {"python": sys.version.split()[0], "blinker": version("blinker"),
                              "machine": platform.machine(), "cpus": os.cpu_count(),
                              "repeats": REPEATS, "statistic": "best of repeats"}

    print(f"epoch_end.send, nobody listening: {results['no_receiver']['ns_per_emission']:8.1f} ns/emission "
          f"({N_SILENT:,} emissions; empty loop {results['loop_overhead_ns']:.1f} ns)")
    print(f"`if epoch_end.receivers:` guard:  {results['no_receiver_guarded']['ns_per_emission']:8.1f} ns/emission "
          f"({N_SILENT:,} checks)")
    print(f"epoch_end.send, one receiver:     {results['one_receiver']['ns_per_emission']:8.1f} ns/emission "
          f"({N_ONE_RECEIVER:,} emissions)")
    out = Path(__file__).parent / "results" / "emit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
