"""The commands a user is pointed to: ``python -m etegrec`` lists every one, and a finished run prints the
ones that look at it, with its directory in them, ready to run."""
from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import etegrec
from conftest import tiny_command
from etegrec.__main__ import main as list_commands

# a module run only by the package itself: W&B's own process, started by the W&B subscriber
INTERNAL = {"etegrec.hooks.wandb_child"}


def printed_commands(text: str) -> dict[str, list[str]]:
    """The ``python -m MODULE ARGS`` lines of a run's output, as {module: argv}."""
    found = {}
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python", "-m"] and len(words) > 2:
            found[words[2]] = words[3:]
    return found


def test_python_m_etegrec_lists_every_command_of_the_package(capsys):
    package = Path(etegrec.__file__).parent
    runnable = {".".join(("etegrec", *path.relative_to(package).with_suffix("").parts)).removesuffix(".__main__")
                for path in package.rglob("*.py") if '__name__ == "__main__"' in path.read_text()}
    list_commands()
    listed = set(re.findall(r"python -m (etegrec[\w.]*)", capsys.readouterr().out))
    assert runnable - {"etegrec"} - INTERNAL == listed


def test_a_finished_joint_run_prints_report_and_recommend_commands_that_work(tmp_path, capsys, monkeypatch):
    tiny_command(tmp_path, "joint", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
                 "--set", "joint.epochs=2", "--output-dir", str(tmp_path / "run"))
    commands = printed_commands(capsys.readouterr().out)
    assert set(commands) == {"etegrec.report", "etegrec.recommend"}
    assert all(argv[0] == str(tmp_path / "run") for argv in commands.values())
    monkeypatch.chdir(tmp_path / "run")  # as a user would, from anywhere: the commands name the run directory
    assert importlib.import_module("etegrec.report").main(commands["etegrec.report"]) == 0
    assert (tmp_path / "run" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert importlib.import_module("etegrec.recommend").main(commands["etegrec.recommend"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["items"]) == 10


def test_a_finished_embedding_run_prints_only_the_report_command(tmp_path, capsys):
    tiny_command(tmp_path, "embed", "--wandb-mode", "disabled", "--set", "embed.epochs=1",
                 "--output-dir", str(tmp_path / "run"))
    commands = printed_commands(capsys.readouterr().out)
    assert list(commands) == ["etegrec.report"]  # recommend needs a joint run's models
    assert importlib.import_module("etegrec.report").main(commands["etegrec.report"]) == 0
    assert (tmp_path / "run" / "report.html").exists()
