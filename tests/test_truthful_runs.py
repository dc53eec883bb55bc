"""Runs that tell the truth: caches keyed on the data's content, one run per directory, the dataset
named after its file, private-looking files that are not private, finished runs left alone, and the
Ctrl-C that says how to go on."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_while_embed_stage_held, tiny_command, write_structured_inter
from etegrec import signals
from etegrec.config import load_config
from etegrec.hooks.eventlog import read_events
from etegrec.training import joint
from etegrec.training.run.rundir import default_run_dir, hold_run_dir
from etegrec.training.run.cache import load_stage_data, stage_dir
from etegrec.training.embed import EMBED

TINY = ["--config", "tiny", "--wandb-mode", "disabled", "--set", "embed.epochs=1", "--set", "rqvae.epochs=2",
        "--set", "joint.epochs=2", "--set", "joint.finetune_epochs=0", "--set", "data.max_users=null"]


def _reverse_timestamps(path: Path) -> None:
    """Each user's timestamps in reverse order, in place: same users, items and count, other sequences."""
    header, *rows = path.read_text().splitlines()
    by_user: dict[str, list[list[str]]] = {}
    for row in rows:
        by_user.setdefault(row.split("\t")[0], []).append(row.split("\t"))
    out = [header]
    for fields in by_user.values():
        times = [f[3] for f in fields][::-1]
        out += ["\t".join([*f[:3], t]) for f, t in zip(fields, times)]
    path.write_text("\n".join(out) + "\n")


def test_an_edited_data_file_rebuilds_the_cached_stages_and_an_unchanged_one_reuses_them(tmp_path):
    inter = write_structured_inter(tmp_path / "walk.inter")
    argv = [*TINY, "--data-path", str(inter)]
    with signals.recording(signals.run_started) as first:
        assert joint.main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    with signals.recording(signals.run_started) as again:
        assert joint.main([*argv, "--output-dir", str(tmp_path / "b")]) == 0
    _reverse_timestamps(inter)
    with signals.recording(signals.run_started) as edited:
        assert joint.main([*argv, "--output-dir", str(tmp_path / "c")]) == 0
    assert [e.payload["stage"] for e in first] == ["embed", "rqvae", "joint"]
    assert [e.payload["stage"] for e in again] == ["joint"]  # same content: the cache is used
    assert [e.payload["stage"] for e in edited] == ["embed", "rqvae", "joint"]  # new content: no stale stage
    with signals.recording(signals.run_started) as rebuilt:
        assert joint.main([*argv, "--output-dir", str(tmp_path / "d"), "--rebuild"]) == 0
    assert [e.payload["stage"] for e in rebuilt] == ["embed", "rqvae", "joint"]


def test_the_cache_key_follows_the_prepared_content_not_the_path(tmp_path):
    a = write_structured_inter(tmp_path / "a.inter")
    (tmp_path / "copy").mkdir()
    b = write_structured_inter(tmp_path / "copy" / "a.inter")  # same content elsewhere
    keys = []
    for path in (a, b):
        config = load_config("tiny", [f"data.data_path={path}", "data.dataset=walk"])
        data = load_stage_data(config)
        keys.append(stage_dir(config, EMBED, data))
    assert keys[0] == keys[1]
    _reverse_timestamps(b)
    config = load_config("tiny", [f"data.data_path={b}", "data.dataset=walk"])
    data = load_stage_data(config)
    assert stage_dir(config, EMBED, data) != keys[0]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny")
    monkeypatch.setattr("time.strftime", lambda fmt: "20261201-120000")
    first, second = default_run_dir("joint", config), default_run_dir("joint", config)
    assert first.name == "joint-ml-100k-20261201-120000" and second.name == first.name + "-2"
    assert first.is_dir() and second.is_dir()


def test_a_directory_a_live_run_holds_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "held"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from etegrec.training.run.rundir import hold_run_dir; "
        f"hold_run_dir({str(run_dir)!r}); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run([sys.executable, "-m", "etegrec.training.joint", *TINY, "--output-dir", str(run_dir)],
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: run directory {str(run_dir.resolve())!r} is in use by another live "
                                     f"run (pid {holder.pid}); wait for it to end or choose another --output-dir")
    hold_run_dir(run_dir)  # the holder is gone: its lock went with it


def test_the_dataset_is_named_after_the_users_file(tmp_path):
    inter = write_structured_inter(tmp_path / "my-shop.inter")
    assert joint.main([*TINY, "--data-path", str(inter), "--output-dir", str(tmp_path / "run")]) == 0
    config = json.loads(json.dumps(__import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text())))
    assert config["data"]["dataset"] == "my-shop"
    assert any(p.name.startswith("embed-my-shop-") for p in (Path(os.environ["ETEGREC_HOME"]) / "stages").iterdir())


def test_outputs_get_the_mode_of_the_umask_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        inter = write_structured_inter(tmp_path / "walk.inter")
        assert joint.main([*TINY, "--data-path", str(inter), "--output-dir", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    embed = next((Path(os.environ["ETEGREC_HOME"]) / "stages").glob("embed-*"))
    for path in [tmp_path / "run" / name for name in ("config.yaml", "metrics.json", "checkpoints/best.pt",
                                                      "checkpoints/last.pt")] + [embed / "embeddings.npy",
                                                                                embed / "item_map.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_resuming_a_finished_run_says_so_and_touches_nothing(tmp_path, capsys):
    inter = write_structured_inter(tmp_path / "walk.inter")
    argv = [*TINY, "--data-path", str(inter), "--output-dir", str(tmp_path / "run")]
    assert joint.main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert joint.main([*argv, "--resume"]) == 0
    assert "is finished" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    tiny_command(root, "embed", "--set", "embed.epochs=1", "--wandb-mode", "offline", "--output-dir", str(root / "run"))
    return root


def test_the_embed_stage_run_alone_logs_its_own_wandb_run(embed_run):
    wandb = str(Path(sys.executable).with_name("wandb"))
    log = next((embed_run / "run" / "wandb").glob("*/run-*.wandb"))
    records = [json.loads(line) for line in subprocess.run([wandb, "leet", "inspect", "--json", str(log)],
                                                           capture_output=True, text=True, check=True).stdout.splitlines()
               if line.strip()]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["project"] == "ETEGRec-Embed" and run["display_name"] == "run"
    assert any("val/ndcg@10" in r["history"]["item"] for r in records if r["type"] == "history")


def test_fit_diagnostics_never_overwrite_the_committed_results(embed_run):
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fit.json"
    before = committed.read_bytes()
    subprocess.run([sys.executable, str(committed.parents[1] / "fit.py"), str(embed_run / "run")], check=True,
                   capture_output=True, text=True, timeout=300,
                   env={**os.environ, "ETEGREC_HOME": str(embed_run / "home")})
    assert committed.read_bytes() == before
    report = json.loads((embed_run / "fit-run.json").read_text())
    assert str(embed_run / "run") in json.dumps(report)


def test_every_stage_takes_format_as_the_readers_error_says(tmp_path):
    from etegrec.training.run.cli import common_parser, parse_stage_args

    inter = write_structured_inter(tmp_path / "walk.txt")
    args = parse_stage_args(common_parser("python -m etegrec.training.rqvae", "x"),
                            ["--config", "tiny", "--data-path", str(inter), "--format", "inter",
                             "--output-dir", str(tmp_path / "run")])
    assert args.config.data.format == "inter" and args.config.data.dataset == "walk.txt"


def test_a_run_that_needs_a_stage_another_run_is_training_waits_for_it_and_reuses_it(tmp_path):
    inter = write_structured_inter(tmp_path / "walk.inter")
    argv = [*TINY, "--data-path", str(inter)]
    log = tmp_path / "waiting.log"
    holder, folder = run_while_embed_stage_held(argv, [sys.executable, "-m", "etegrec.training.joint", *argv,
                                                       "--output-dir", str(tmp_path / "run")], log)
    lines = log.read_text().splitlines()
    assert lines[0] == (f"[embed] another run (pid {holder}) is training the cached item embeddings for this "
                        f"config in {folder}; waiting for it to end")
    assert not any(line.startswith("[embed]") for line in lines[1:])  # reused: never trained a second time
    started = [e for e in read_events(folder / "events.jsonl") if e["signal"] == "run_started"]
    assert len(started) == 1
