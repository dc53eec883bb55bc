"""A stage added by docs/architecture.md's recipe alone: one declaration (here, in this file) and its
registration. The console, the tracking subscriber, the stage cache and ``python -m etegrec`` must all
pick it up, with nothing else taught its name."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import write_structured_inter
from etegrec import signals
from etegrec.__main__ import main as list_commands
from etegrec.config import load_config
from etegrec.hooks.wandb import WandbSubscriber
from etegrec.hooks.wandb_rows import KeyMap, phase_loss_key
from etegrec.training import stages
from etegrec.training.run.cache import load_stage_data, stage_dir
from etegrec.training.run.cli import stage_main
from etegrec.training.embed import EMBED
from etegrec.training.run.fit import StageTrainer
from etegrec.training.run.options import RunOptions
from etegrec.training.run import Run
from etegrec.training.stage import Stage
from etegrec.training.run.stopping import EarlyStopping


class ToyTrainer(StageTrainer):
    """Shrinks the item embeddings' norm by ``rqvae.lr`` an epoch: a stage that needs the embed stage."""

    def __init__(self, config, run, data, embeddings: np.ndarray) -> None:
        self.config, self.run = config, run
        self.norm = float(np.linalg.norm(embeddings))
        self.stopping = EarlyStopping("score", mode="max", patience=3)

    def segments(self) -> list[list[str]]:
        return [[self.stage] * 2]

    def train_one_epoch(self, epoch, phase, progress) -> None:
        self.norm *= 1 - self.config.rqvae.lr
        signals.epoch_end.send(self, stage=self.stage, phase=phase, epoch=epoch, losses={"loss_total": self.norm},
                               lr={"lr": self.config.rqvae.lr}, seconds=0.0, samples_per_second=0.0)

    def validate(self, epoch: int) -> dict[str, float]:
        metrics = {"score": -self.norm}
        signals.evaluated.send(self, stage=self.stage, split="valid", epoch=epoch, metrics=metrics)
        return metrics

    def state_dict(self) -> dict:
        return {"norm": self.norm}

    def load_state_dict(self, state: dict, *, resume: bool = False) -> None:
        self.norm = state["norm"]

    def finish(self, best: dict) -> dict:
        return {"valid": self.stopping.best_metrics}


TOY = Stage(name="toy", command="test_toy_stage", label="toy norms", summary="shrink the item embeddings' norm",
            sections=("rqvae",), needs=(EMBED,), trainer=ToyTrainer, project="Toy-Project",
            run_name=lambda config: f"toy-{config.run.seed}",
            key_map=KeyMap(loss_key=phase_loss_key, split_prefix={"valid": "toyval"}))


@pytest.fixture
def registered(monkeypatch):
    """The recipe's registration: the stage after those it needs in ``stages.STAGES``."""
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES, TOY))


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("ETEGREC_HOME", str(tmp_path / "home"))
    inter = write_structured_inter(tmp_path / "walk.inter")
    return load_config("tiny", [f"data.data_path={inter}", "data.dataset=walk", "embed.epochs=1"])


def test_python_m_etegrec_lists_a_registered_stage(registered, capsys):
    list_commands()
    out = capsys.readouterr().out
    assert re.search(r"toy norms +python -m test_toy_stage\n +shrink the item embeddings' norm", out)


def test_its_command_trains_it_after_the_stage_it_needs_and_the_console_numbers_both(config, tmp_path, capsys):
    argv = ["--config", "tiny", "--data-path", config.data.data_path, "--set", "embed.epochs=1",
            "--wandb-mode", "disabled", "--output-dir", str(tmp_path / "run")]
    assert stage_main(TOY, argv) == 0
    out, err = capsys.readouterr()
    assert "[embed] no cached item embeddings for this config; training it in" in out
    assert re.search(r"\[embed\] epoch 0: .* \| stage 1/2, epoch 1/1", err)
    assert re.search(r"\[toy\] epoch 1: loss_total=\S+ \| lr=0.001 .* \| stage 2/2, epoch 2/2", err)
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert stage_dir(config, EMBED, load_stage_data(config)).joinpath("embeddings.npy").exists()  # cached, reusable


def test_its_tracked_run_logs_under_its_project_run_name_and_key_map(config, tmp_path):
    run = Run(config, RunOptions.resolve(config, output_dir=tmp_path / "run", wandb_mode="offline", console=False),
              stage=TOY)
    tracker = next(s for s in run.subscribers if isinstance(s, WandbSubscriber))
    assert (tracker.project, tracker.run_name, tracker.stage) == ("Toy-Project", f"toy-{config.run.seed}", "toy")
    assert tracker.key_map.epoch_end(phase="toy", losses={"loss_total": 2.0}) == {"train/toy_loss_total": 2.0}
    assert tracker.key_map.evaluated(split="valid", metrics={"score": -1.0}) == {"toyval/score": -1.0}


def test_its_cache_key_follows_its_sections_and_those_of_the_stages_it_needs(config):
    data = load_stage_data(config)
    key = stage_dir(config, TOY, data)
    assert key.name.startswith("toy-walk-")
    config.joint.lr_rec *= 2  # a section it does not read: the same cached run
    assert stage_dir(config, TOY, data) == key
    config.rqvae.lr *= 2  # its own section
    assert stage_dir(config, TOY, data) != key
    config.rqvae.lr /= 2
    config.embed.hidden *= 2  # the section of the stage it needs: other embeddings, another run
    assert stage_dir(config, TOY, data) != key


if __name__ == "__main__":  # the recipe's command: python -m test_toy_stage, from tests/
    import sys

    sys.exit(stage_main(TOY))
