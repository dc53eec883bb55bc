"""The event log, the console subscriber and ``--subscriber`` resolution."""
from __future__ import annotations

import gc
import io
import json
import math
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from etegrec import signals
from etegrec.hooks import (
    ConsoleSubscriber,
    EventLog,
    FunctionSubscriber,
    Subscriber,
    SubscriberError,
    read_events,
    resolve_subscriber,
)


@pytest.fixture(autouse=True)
def no_leaked_receivers():
    """Disconnect whatever a test left connected, so signals stay clean for the next one."""
    before = {sig: set(sig.receivers) for sig in signals.ALL_SIGNALS}
    yield
    for sig, ids in before.items():
        for rid in set(sig.receivers) - ids:
            receiver = sig.receivers[rid]
            receiver = receiver() if isinstance(receiver, weakref.ref) else receiver
            if receiver is not None:
                sig.disconnect(receiver)


@pytest.fixture
def write_module(tmp_path, monkeypatch, request):
    """Write ``name.py`` into an importable folder; it is forgotten by ``sys.modules`` afterwards."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))

    def write(name: str, source: str) -> Path:
        path = folder / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        request.addfinalizer(lambda: sys.modules.pop(name, None))
        return path
    return write


EPOCH_END = {"stage": "rec", "phase": "rec", "epoch": 2, "losses": {"total": 0.5}, "lr": {"rec": 1e-3},
             "seconds": 1.5, "samples_per_second": 1000.0}


# --------------------------------------------------------------------------------------- EventLog

@pytest.fixture
def event_log(tmp_path):
    log = EventLog(tmp_path / "run" / "events.jsonl", rank=0)
    log.start()
    log.connect()
    yield log
    log.disconnect()
    log.finish()


def lines_of(log: EventLog) -> list[str]:
    return log.path.read_text().splitlines()


def test_event_log_writes_one_line_per_signal(event_log):
    signals.run_started.send(None, stage="rec", config={}, run_dir="r", rank=0, world_size=1)
    signals.epoch_end.send(None, **EPOCH_END)
    signals.run_finished.send(None, stage="rec", best_metrics={}, best_checkpoint=None, seconds=1.0)

    assert [json.loads(line)["signal"] for line in lines_of(event_log)] == ["run_started", "epoch_end", "run_finished"]


def test_event_log_line_is_signal_time_rank_then_payload(tmp_path):
    log = EventLog(tmp_path / "events.jsonl", rank=3)
    with log:
        signals.epoch_end.send(None, **EPOCH_END)

    record = json.loads(lines_of(log)[0])
    assert list(record)[:3] == ["signal", "time", "rank"]
    assert record["signal"] == "epoch_end"
    assert record["rank"] == 3
    assert isinstance(record["time"], float)
    assert {k: v for k, v in record.items() if k not in ("signal", "time", "rank")} == EPOCH_END


def test_event_log_is_flushed_per_line_before_finish(event_log):
    signals.epoch_end.send(None, **EPOCH_END)

    assert len(lines_of(event_log)) == 1  # read while the file is still open


def test_event_log_converts_numpy_and_torch_values(event_log):
    signals.codebook_usage.send(
        None, stage="rqvae", epoch=np.int64(4), layer=0, counts=np.arange(4, dtype=np.int32),
        utilization=np.float32(0.75), perplexity=torch.tensor(2.5), gini=np.float64(0.25),
        dead_codes=torch.tensor([1, 0]), codes=np.array([[1, 2], [3, 4]]),
        weights=torch.ones(2, requires_grad=True), flag=np.bool_(True))

    record = json.loads(lines_of(event_log)[0])
    assert record["epoch"] == 4
    assert record["counts"] == [0, 1, 2, 3]
    assert record["utilization"] == 0.75
    assert record["perplexity"] == 2.5
    assert record["gini"] == 0.25
    assert record["dead_codes"] == [1, 0]
    assert record["codes"] == [[1, 2], [3, 4]]
    assert record["weights"] == [1.0, 1.0]
    assert record["flag"] is True


def test_event_log_writes_non_finite_floats_as_strings(event_log):
    signals.epoch_end.send(None, **{**EPOCH_END, "losses": {"nan": math.nan, "inf": np.float32(np.inf),
                                                           "neg": -math.inf, "arr": np.array([1.0, np.nan])}})

    line = lines_of(event_log)[0]
    record = json.loads(line)  # strict JSON parsers reject bare NaN and Infinity
    assert record["losses"] == {"nan": "nan", "inf": "inf", "neg": "-inf", "arr": [1.0, "nan"]}
    assert "NaN" not in line and "Infinity" not in line


def test_read_events_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"signal": "run_started"}\n{"signal": "epoch_end"}\n{"signal": "epo')

    assert read_events(path) == [{"signal": "run_started"}, {"signal": "epoch_end"}]


def test_read_events_raises_on_a_malformed_middle_line(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"signal": "run_started"}\n{"signal": \n{"signal": "epoch_end"}\n')

    with pytest.raises(ValueError, match=r"events\.jsonl: line 2 is not valid JSON"):
        read_events(path)


def test_read_events_reads_back_what_the_event_log_wrote(event_log):
    signals.epoch_end.send(None, **EPOCH_END)
    signals.epoch_end.send(None, **{**EPOCH_END, "epoch": 3})

    assert [e["epoch"] for e in read_events(event_log.path)] == [2, 3]


# --------------------------------------------------------------------------------------- console

CONSOLE_EVENTS = [
    (signals.run_started, {"stage": "rec", "config": {}, "run_dir": "runs/x", "rank": 0, "world_size": 2}),
    (signals.codebook_usage, {"stage": "rqvae", "epoch": 2, "layer": 1, "counts": np.ones(8),
                              "utilization": 1.0, "perplexity": 8.0, "gini": 0.0, "dead_codes": 0}),
    (signals.epoch_end, EPOCH_END),
    (signals.codes_assigned, {"stage": "joint", "epoch": 2, "codes": np.zeros((5, 4), dtype=np.int64),
                              "use_forge": True, "policy": "sorted", "max_conflict": 12, "max_conflict_before": 40,
                              "collision_rate": 0.02, "changed": 3, "seconds": 0.1}),
    (signals.evaluated, {"stage": "rec", "split": "valid", "epoch": 2, "metrics": {"ndcg@10": 0.05}}),
    (signals.checkpoint_saved, {"stage": "rec", "epoch": 2, "path": "ckpt/best.pt", "is_best": True}),
    (signals.run_finished, {"stage": "rec", "status": "completed", "best_metrics": {"ndcg@10": 0.05},
                            "best_checkpoint": "ckpt/best.pt", "seconds": 9.0}),
]


def test_console_prints_one_line_per_event():
    out = io.StringIO()
    with ConsoleSubscriber(file=out):
        for sig, payload in CONSOLE_EVENTS:
            sig.send(None, **payload)

    lines = out.getvalue().splitlines()
    assert len(lines) == len(CONSOLE_EVENTS)
    assert "codebook layer 1: utilization 100.0%" in lines[1]  # printed with its epoch's line
    assert "max_conflict 12 (before FORGE 40)" in lines[3]
    assert "valid @ epoch 2: ndcg@10=0.05" in lines[4]


def test_console_without_codebooks_skips_codebook_lines():
    out = io.StringIO()
    with ConsoleSubscriber(file=out, codebooks=False):
        for sig, payload in CONSOLE_EVENTS[1:3]:
            sig.send(None, **payload)

    assert len(out.getvalue().splitlines()) == 1 and "codebook" not in out.getvalue()


def test_console_prints_every_epoch_line_of_fast_epochs_and_throttles_step_lines():
    out = io.StringIO()
    with ConsoleSubscriber(file=out, min_interval=3600):
        for epoch in range(5):
            for step in range(3):
                signals.step_end.send(None, stage="rec", phase="rec", epoch=epoch, step=3 * epoch + step,
                                      losses={"loss": 1.0}, lr={"lr": 0.01})
            signals.codebook_usage.send(None, **{**CONSOLE_EVENTS[1][1], "epoch": epoch})
            signals.epoch_end.send(None, **{**EPOCH_END, "epoch": epoch})
        signals.evaluated.send(None, **{**CONSOLE_EVENTS[4][1], "epoch": 4})

    lines = out.getvalue().splitlines()
    steps = [line for line in lines if " step " in line]
    assert steps == ["[rec] epoch 0 step 0: loss=1 | lr=0.01"]  # one step line within the interval
    for epoch in range(5):
        assert sum(f"epoch {epoch} codebook layer 1" in line for line in lines) == 1
        assert sum(line.startswith(f"[rec] epoch {epoch}: total=0.5") for line in lines) == 1
    assert "valid @ epoch 4" in lines[-1]


def test_console_says_the_test_line_is_the_best_checkpoints_and_never_doubles_words():
    out = io.StringIO()
    with ConsoleSubscriber(file=out):
        signals.epoch_end.send(None, stage="embed", phase="embed", epoch=0, losses={"loss": 6.5}, lr={"lr": 0.001},
                               seconds=1.0, samples_per_second=10.0)
        signals.evaluated.send(None, stage="embed", split="test", epoch=11, metrics={"ndcg@10": 0.09})
    first, second = out.getvalue().splitlines()
    assert first.startswith("[embed] epoch 0: loss=6.5 | lr=0.001 |")
    assert second == "[embed] test (best checkpoint, epoch 11): ndcg@10=0.09"


# -------------------------------------------------------------------------------------- resolver

PROBE_SOURCE = """
    RECEIVED = []

    class Probe:
        def on_epoch_end(self, sender, *, epoch, **extra):
            RECEIVED.append(epoch)
"""


def test_resolves_module_colon_class(write_module):
    write_module("probe_cls", PROBE_SOURCE)

    with resolve_subscriber("probe_cls:Probe"):
        signals.epoch_end.send(None, **EPOCH_END)

    assert sys.modules["probe_cls"].RECEIVED == [2]


def test_resolves_a_subscriber_subclass_as_is(write_module):
    write_module("probe_sub", """
        from etegrec.hooks import Subscriber

        class Probe(Subscriber):
            main_process_only = True
    """)

    sub = resolve_subscriber("probe_sub:Probe")

    assert type(sub).__name__ == "Probe"
    assert sub.main_process_only


def test_resolves_a_file_path_spec(tmp_path, request):
    path = tmp_path / "probe_file.py"
    path.write_text(textwrap.dedent(PROBE_SOURCE))
    request.addfinalizer(lambda: sys.modules.pop("probe_file", None))

    sub = resolve_subscriber(f"{path}:Probe")
    with sub:
        signals.epoch_end.send(None, **EPOCH_END)

    assert sub.obj.on_epoch_end.__globals__["RECEIVED"] == [2]


def test_plain_function_receives_every_signal_with_its_name(write_module):
    write_module("probe_fn", """
        CALLS = []

        def record(sender, *, signal, **payload):
            CALLS.append((signal, payload))
    """)
    sub = resolve_subscriber("probe_fn:record")

    with sub:
        signals.evaluated.send(None, stage="rec", split="valid", epoch=1, metrics={"ndcg@10": 0.1})
        signals.checkpoint_saved.send(None, stage="rec", epoch=1, path="p", is_best=False)

    assert isinstance(sub, FunctionSubscriber)
    assert sys.modules["probe_fn"].CALLS == [
        ("evaluated", {"stage": "rec", "split": "valid", "epoch": 1, "metrics": {"ndcg@10": 0.1}}),
        ("checkpoint_saved", {"stage": "rec", "epoch": 1, "path": "p", "is_best": False}),
    ]


def test_object_with_on_signal_methods_is_adapted_with_start_and_finish(write_module):
    write_module("probe_obj", """
        class Watch:
            main_process_only = True

            def __init__(self):
                self.seen = []

            def start(self):
                self.seen.append("start")

            def on_evaluated(self, sender, *, split, **extra):
                self.seen.append(split)

            def finish(self, status):
                self.seen.append(status)

        watch = Watch()
    """)
    sub = resolve_subscriber("probe_obj:watch")

    with sub:
        signals.evaluated.send(None, stage="rec", split="test", epoch=1, metrics={})

    assert sys.modules["probe_obj"].watch.seen == ["start", "test", "completed"]
    assert sub.main_process_only


def test_zero_argument_factory_is_called_once(write_module):
    write_module("probe_factory", PROBE_SOURCE + """
    MADE = []

    def make():
        MADE.append(1)
        return Probe()
""")

    with resolve_subscriber("probe_factory:make"):
        signals.epoch_end.send(None, **EPOCH_END)

    module = sys.modules["probe_factory"]
    assert module.MADE == [1]
    assert module.RECEIVED == [2]


@pytest.mark.parametrize(("spec", "message"), [
    ("probe_missing_colon", r"--subscriber 'probe_missing_colon' is not of the form MODULE:CALLABLE"),
    ("probe_module_that_does_not_exist:fn",
     r"cannot import module 'probe_module_that_does_not_exist' .*is it on PYTHONPATH\?"),
    ("probe_attrs:nope", r"module 'probe_attrs' has no attribute 'nope'"),
    ("probe_attrs:VALUE", r"'VALUE' gives a int, which is neither callable nor has on_<signal> methods"),
    ("no/such/file.py:fn", r"file 'no/such/file.py' does not exist"),
])
def test_bad_subscriber_spec_is_a_clear_error(write_module, spec, message):
    write_module("probe_attrs", "VALUE = 42\n")

    with pytest.raises(SubscriberError, match=message):
        resolve_subscriber(spec)


def test_resolved_subscriber_is_held_strongly(write_module):
    write_module("probe_closure", """
        RECEIVED = []

        def make():
            def on_any(sender, *, signal, **payload):  # reachable only through the subscriber
                RECEIVED.append(signal)
            return on_any
    """)
    sub = resolve_subscriber("probe_closure:make").connect()
    closure, holder = weakref.ref(sub.fn), weakref.ref(sub)
    del sub
    gc.collect()

    signals.epoch_end.send(None, **EPOCH_END)

    assert closure() is not None
    assert sys.modules["probe_closure"].RECEIVED == ["epoch_end"]
    holder().disconnect()


def test_subscriber_connects_its_on_signal_methods_strongly():
    seen = []

    class Probe(Subscriber):
        def on_epoch_end(self, sender, *, epoch, **extra):
            seen.append(epoch)
    Probe().connect()
    gc.collect()

    signals.epoch_end.send(None, **EPOCH_END)

    assert seen == [2]


JOINT_PHASES = ["id", "rec", "rec"] * 3 + ["finetune"] * 3  # joint.epochs 9, cycle 3, finetune_epochs 3
PIPELINE = ["embed", "rqvae", "joint"]  # the stages of the joint command


def test_console_epoch_lines_say_the_pipeline_stage_and_the_epochs_left():
    out = io.StringIO()
    with ConsoleSubscriber(file=out, pipeline=PIPELINE):
        signals.run_started.send(None, stage="joint", config={}, run_dir="r", rank=0, world_size=1, resumed=False,
                                 start_epoch=4, phases=JOINT_PHASES)
        signals.epoch_end.send(None, **{**EPOCH_END, "stage": "joint", "epoch": 4})
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[joint] epoch 4 rec:") and line.split(" | ")[-1].startswith("stage 3/3, epoch 5/12, about ")


def test_the_time_left_counts_each_phase_at_its_own_pace():
    now = [0.0]
    out = io.StringIO()
    with ConsoleSubscriber(file=out, clock=lambda: now[0], pipeline=PIPELINE):
        signals.run_started.send(None, stage="joint", config={}, run_dir="r", rank=0, world_size=1, resumed=False,
                                 start_epoch=0, phases=JOINT_PHASES)
        for epoch, seconds in enumerate([1.0, 10.0, 10.0, 1.0]):  # a tokenizer epoch is 10x faster
            now[0] += seconds
            signals.epoch_end.send(None, **{**EPOCH_END, "stage": "joint", "phase": JOINT_PHASES[epoch],
                                            "epoch": epoch})
    lines = [line.split(" | ")[-1] for line in out.getvalue().splitlines()[1:]]
    # after epoch 0 only the tokenizer's pace is known: the 11 epochs left are estimated at it
    assert lines[0] == "stage 3/3, epoch 1/12, about 11 s left"
    # then 4 rec epochs at 10 s, 1 id epoch at 1 s and 3 finetune epochs, not seen yet, at the slowest pace
    assert lines[3] == "stage 3/3, epoch 4/12, about 71 s left"  # one mean over all epochs said 44 s


def test_progress_bars_stay_out_of_a_log_file(tmp_path):
    import subprocess
    import sys

    from conftest import write_structured_inter

    inter = write_structured_inter(tmp_path / "walk.inter")
    with open(tmp_path / "log.txt", "w") as log:  # stderr is a file, as with `... 2> log.txt`
        subprocess.run([sys.executable, "-m", "etegrec.training.rqvae", "--config", "tiny", "--set", "embed.epochs=1",
                        "--data-path", str(inter), "--wandb-mode", "disabled", "--output-dir", str(tmp_path / "run")],
                       stdout=log, stderr=log, check=True, timeout=300,
                       env={**__import__("os").environ, "ETEGREC_HOME": str(tmp_path / "home")})
    text = (tmp_path / "log.txt").read_text()
    assert "\r" not in text and "it/s]" not in text
    assert "[rqvae] epoch 5: " in text  # the console's lines are all there
