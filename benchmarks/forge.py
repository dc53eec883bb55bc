"""Time ``assign_codes`` against a per-item Python loop on 1,000,000 x 3 random codes.

Run: ``python benchmarks/forge.py``; prints both times and their ratio, checks that the two agree
and writes ``benchmarks/results/forge.json``. Target: vectorised >= 40x faster, well under 1 s.
"""
from __future__ import annotations

import json
import platform
import time
import zlib
from pathlib import Path

import numpy as np

from etegrec.forge import assign_codes

N_ITEMS, CODE_LEN, CODE_NUM, SEED, REPEATS = 1_000_000, 3, 256, 0, 5
RESULT = Path(__file__).resolve().parent / "results" / "forge.json"


def loop_reference(rq: np.ndarray, code_num: int) -> np.ndarray:
    """FORGE round_robin one item at a time (dicts; one Adler-32 per distinct prefix)."""
    rows = rq.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}  # prefix -> [offset, items seen so far]
    seen: dict[tuple[int, ...], int] = {}
    for row in rows:
        prefix = tuple(row[:-1])
        group = groups.get(prefix)
        if group is None:
            group = groups[prefix] = [zlib.adler32(str(prefix).encode("utf-8")) % code_num, 0]
        row[-1] = (group[0] + group[1]) % code_num
        group[1] += 1
        full = tuple(row)
        suffix = seen.get(full, 0)
        seen[full] = suffix + 1
        row.append(suffix)
    return np.array(rows, dtype=np.int64)


def main() -> None:
    rq = np.random.default_rng(SEED).integers(0, CODE_NUM, size=(N_ITEMS, CODE_LEN))
    vectorised = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        assignment = assign_codes(rq, CODE_NUM)
        vectorised.append(time.perf_counter() - started)
    started = time.perf_counter()
    expected = loop_reference(rq, CODE_NUM)
    loop_seconds = time.perf_counter() - started
    equal = bool(np.array_equal(assignment.codes, expected))
    best = min(vectorised)
    print(f"assign_codes on {N_ITEMS:,} x {CODE_LEN} codes in [0, {CODE_NUM}), seed {SEED}")
    median = float(np.median(vectorised))
    print(f"vectorised: {best:.3f} s (best of {REPEATS}; median {median:.3f} s; "
          f"first, cold call {vectorised[0]:.3f} s)")
    print(f"python loop: {loop_seconds:.3f} s")
    print(f"ratio: {loop_seconds / best:.1f}x (vs median {loop_seconds / median:.1f}x)   equal: {equal}")
    print(f"max_conflict {assignment.max_conflict} (before FORGE {assignment.max_conflict_before}), "
          f"{assignment.n_prefix_groups} prefix groups")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "n_items": N_ITEMS, "code_len": CODE_LEN, "code_num": CODE_NUM, "seed": SEED,
        "vectorised_seconds_best": best, "vectorised_seconds_all": vectorised,
        "vectorised_seconds_median": median, "loop_seconds": loop_seconds,
        "ratio": loop_seconds / best, "ratio_vs_median": loop_seconds / median, "equal": equal,
        "max_conflict": assignment.max_conflict, "max_conflict_before": assignment.max_conflict_before,
        "n_prefix_groups": assignment.n_prefix_groups, "numpy": np.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }, indent=2) + "\n")
    if not equal:
        raise SystemExit("assign_codes and the loop reference disagree.")


if __name__ == "__main__":
    main()
