"""A subscriber of your own: watch FORGE's max_conflict at every code refresh.

From the command line (any stage that refreshes codes, i.e. joint training):

    python -m etegrec.training.joint --config tiny --subscriber examples/conflict_watch.py:ConflictWatch

From Python:

    from etegrec import signals
    from examples.conflict_watch import ConflictWatch

    watch = ConflictWatch()                                   # keep a reference: blinker holds
    signals.codes_assigned.connect(watch.on_codes_assigned)   # receivers weakly
"""
from __future__ import annotations

import warnings


class ConflictWatch:
    """Prints max_conflict at each code refresh and warns when it nears the suffix's capacity."""

    def __init__(self, warn_at: float = 0.5) -> None:
        self.warn_at = warn_at  # warn when max_conflict exceeds this share of code_num
        self.history: list[tuple[int, int]] = []  # (epoch, max_conflict)

    def on_codes_assigned(self, sender, *, epoch, codes, max_conflict, max_conflict_before, **extra):
        code_num = getattr(getattr(sender, "recommender", None), "code_num", None) or int(codes.max()) + 1
        self.history.append((epoch, max_conflict))
        print(f"[conflict-watch] epoch {epoch}: max_conflict {max_conflict} "
              f"(without FORGE {max_conflict_before}), capacity {code_num}")
        if max_conflict > self.warn_at * code_num:
            warnings.warn(f"max_conflict {max_conflict} is above {self.warn_at:.0%} of code_num {code_num}: "
                          "the tokenizer may be collapsing", stacklevel=2)
