"""A finished joint run, loaded for use: ``etegrec.load_run(run_dir).recommend(histories)``.

Everything comes from the run directory: ``config.yaml``, ``item_codes.tsv`` (the raw item ids in
item order, with the codes of the best checkpoint) and ``checkpoints/best.pt``. No cache under
``$ETEGREC_HOME`` is needed, so a run directory copied to another machine still recommends.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from etegrec.config import Config, ConfigError, run_config
from etegrec.models import RQVAE, CodeTrie, T5Recommender

from .joint import JOINT
from .joint.evaluation import beam_recommend
from .joint.recommender import build_recommender
from .rqvae.tokenizer import build_tokenizer, input_width
from .run.checkpoint import read_checkpoint
from .run.item_codes import read_item_codes

__all__ = ["TrainedRun", "load_run", "read_item_codes"]

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A joint run's config, item ids and codes, tokenizer and recommender, on ``device``."""

    run_dir: Path
    config: Config
    item_ids: tuple[str, ...]  # raw id of item i + 1 at position i
    index_of: dict[str, int]  # raw id -> item index (1-based; 0 is padding)
    codes: torch.Tensor  # (n_items + 1, L + 1), row 0 = padding
    tokenizer: RQVAE
    recommender: T5Recommender
    trie: CodeTrie

    def recommend(self, histories: Sequence[Sequence[str]], k: int = 10, *, skip_unknown: bool = False
                  ) -> list[list[tuple[str, float]]]:
        """The top ``k`` items (raw id, score) after each history of raw item ids, oldest first.

        The same constrained beam search as evaluation (``evaluation.beam_size`` beams; ``k`` at most
        ``evaluation.top_k``); scores are the model's summed code log-probabilities. Only the most recent
        ``data.max_his_len`` items of a history are read.

        Raises:
            TypeError: ``histories``, or one of them, is a string rather than a list of item ids.
            ValueError: unknown item ids (listed), or a history with no item, unless
                ``skip_unknown``: then unknown ids are left out with a warning, and a history left
                with no known item gets no recommendations (``[]``), with a warning, while the
                others are answered; ``k`` above the beam's ``top_k``.
        """
        cfg = self.config.evaluation
        if not 1 <= k <= cfg.top_k:
            raise ValueError(f"k={k!r} must lie in [1, {cfg.top_k}] (evaluation.top_k of this run)")
        if isinstance(histories, (str, bytes)):  # a string iterates as one-character "ids"
            raise TypeError(f"histories must be a list of histories (lists of raw item ids), got the string "
                            f"{histories!r}; pass [[...]], e.g. [[{histories!r}]] for one history of that one item")
        rows = [self._indices(history, n, skip_unknown) for n, history in enumerate(histories)]
        answered = [i for i, row in enumerate(rows) if row]
        out: list[list[tuple[str, float]]] = [[] for _ in rows]
        if not answered:
            return out
        length = self.config.data.max_his_len
        padded = np.zeros((len(answered), length), dtype=np.int64)
        for i, n in enumerate(answered):
            row = rows[n][-length:]
            padded[i, length - len(row):] = row
        items, scores = beam_recommend(self.recommender, self.codes, self.trie, padded, cfg,
                                       renormalize=self.config.recommender.renormalize)
        for n, item_row, score_row in zip(answered, items[:, :k].tolist(), scores[:, :k].tolist()):
            out[n] = [(self.item_ids[i - 1], s) for i, s in zip(item_row, score_row) if i > 0]
        return out

    def _indices(self, history: Sequence[str], n: int, skip_unknown: bool) -> list[int]:
        """Item indices of history ``n``; ``[]`` for one with no known item, when ``skip_unknown``."""
        if isinstance(history, (str, bytes)):
            raise TypeError(f"history {n} is the string {history!r}, not a list of raw item ids; pass "
                            f"[{history!r}] for a history of that one item")
        unknown = [item for item in history if str(item) not in self.index_of]
        if unknown and not skip_unknown:
            raise ValueError(f"history {n}: unknown item ids {unknown[:10]!r} (not in {self.run_dir}/item_codes.tsv); "
                             "pass skip_unknown=True (--skip-unknown) to leave them out")
        if unknown:
            log.warning("history %d: skipped unknown item ids %r", n, unknown[:10])
        indices = [self.index_of[str(item)] for item in history if str(item) in self.index_of]
        if not indices and not skip_unknown:
            raise ValueError(f"history {n} has no item; a recommendation needs at least one")
        if not indices:
            log.warning("history %d has no known item: it gets no recommendations", n)
        return indices


def load_run(run_dir: str | Path, *, device: str | torch.device = "cpu") -> TrainedRun:
    """Rebuild a finished joint run's tokenizer and recommender (best checkpoint) on ``device``.

    Raises:
        ConfigError: the directory lacks ``config.yaml``, ``item_codes.tsv`` or ``checkpoints/best.pt``, one of
            them cannot be read or does not fit the others (an edited config), the checkpoint is unsafe
            (CheckpointError), or it is not a joint run's.
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "checkpoints/best.pt"):
        if not (run_dir / name).exists():
            raise ConfigError(f"{str(run_dir / name)!r} does not exist: load_run needs a finished joint run's directory")
    config = run_config(run_dir / "config.yaml")
    item_ids, table = read_item_codes(run_dir / "item_codes.tsv")
    state = read_checkpoint(run_dir / "checkpoints" / "best.pt", stage=JOINT.name, what="load_run")
    codes = torch.cat([torch.zeros(1, table.shape[1], dtype=torch.long), torch.as_tensor(table)])
    if not torch.equal(state["codes"].cpu().long(), codes):
        raise ConfigError(f"{str(run_dir / 'item_codes.tsv')!r} does not hold the codes of checkpoints/best.pt; "
                          "the directory mixes two runs")
    try:
        tokenizer = build_tokenizer(config.tokenizer, input_width(config))
        tokenizer.load_state_dict(state["tokenizer"])
        recommender = build_recommender(config, tokenizer, semantic_dim=input_width(config), num_items=len(item_ids))
        recommender.load_state_dict(state["recommender"])
    except (RuntimeError, KeyError) as exc:  # the models the config builds are not the checkpoint's
        first = " ".join(str(exc).split())[:160]
        raise ConfigError(f"{str(run_dir / 'config.yaml')!r} does not describe the models in checkpoints/best.pt "
                          f"({first}); it was edited after the run: put back the run's own config") from None
    device = torch.device(device)
    codes = codes.to(device)
    trie = CodeTrie(codes[1:], code_num=recommender.code_num).to(device)
    recommender.use_trie(trie)
    return TrainedRun(run_dir=run_dir, config=config, item_ids=item_ids,
                      index_of={item: i + 1 for i, item in enumerate(item_ids)}, codes=codes,
                      tokenizer=tokenizer.to(device).eval(), recommender=recommender.to(device).eval(), trie=trie)
