"""The joint stage's learning probes (SPEC section 8): why the recommender is or is not learning.

At every validation a :class:`Prober` measures, on a fixed subsample of validation users, the
quantities of :mod:`etegrec.probes` with the trainer's own model and beam search, and the trainer
emits them as ``signals.probed``. The subsample, its shuffled and shortened copies and the training
popularity are fixed when the prober is built, so successive values compare.
"""
from __future__ import annotations

import numpy as np

from etegrec.data import SequenceData
from etegrec.probes import code_floors, drop_last, popularity_nll, repeat_share, shuffle_histories, topk_overlap

__all__ = ["Prober"]


class Prober:
    """Probes on ``users`` validation users drawn with ``seed``.

    The trainer passed to :meth:`measure` provides ``recommend(history) -> (n, k) item ids``,
    ``code_nll(history, target) -> (n, L)`` per-position cross-entropies, ``item_codes()`` (the
    ``[n_items, L]`` codes in use) and ``codes_changed`` (share changed at the last refresh).
    """

    def __init__(self, data: SequenceData, *, users: int, seed: int) -> None:
        history, target = data.split("valid")
        rng = np.random.default_rng([seed, 0x9B0B])
        pick = np.sort(rng.choice(len(target), size=min(users, len(target)), replace=False))
        self.history, self.target = history[pick], target[pick]
        self.shuffled = shuffle_histories(self.history, rng)
        self.dropped = drop_last(self.history)
        self.target_counts = np.bincount(data.train_target, minlength=data.n_items + 1)[1:]
        self.data_repeat_rate = float((self.history == self.target[:, None]).any(axis=1).mean())

    def __len__(self) -> int:
        return len(self.target)

    def measure(self, trainer) -> dict[str, float]:
        """The probe values for the trainer's current model and codes."""
        ce = trainer.code_nll(self.history, self.target).mean(axis=0)  # (L,)
        floors = code_floors(trainer.item_codes(), self.target_counts, self.target)
        ranked = trainer.recommend(self.history)
        probes = {"item_nll": float(ce.sum()), "popularity_nll": popularity_nll(self.target_counts, self.target)}
        for p, (value, floor) in enumerate(zip(ce, floors)):
            probes[f"code_ce_{p}"], probes[f"code_floor_{p}"] = float(value), float(floor)
        probes.update(
            shuffle_overlap=topk_overlap(ranked, trainer.recommend(self.shuffled)),
            drop_last_overlap=topk_overlap(ranked, trainer.recommend(self.dropped)),
            repeat_share=repeat_share(ranked, self.history),
            data_repeat_rate=self.data_repeat_rate,
            codes_changed=float(trainer.codes_changed),
        )
        return probes
