"""The event bus: documented payloads, ordered dispatch, isolation, strict mode and the recorder."""
from __future__ import annotations

import contextlib
import logging
import random
import re

import pytest

from etegrec import signals
from etegrec.signals import ALL_SIGNALS, BusSignal, Emission, recording

# SPEC.md section 3: the keywords each signal's payload carries at least.
SPEC_PAYLOADS = {
    "run_started": ["stage", "config", "run_dir", "rank", "world_size"],
    "epoch_end": ["stage", "phase", "epoch", "losses", "lr", "seconds", "samples_per_second"],
    "step_end": ["stage", "phase", "epoch", "step", "losses", "lr"],
    "codes_assigned": ["stage", "epoch", "codes", "use_forge", "policy", "max_conflict", "max_conflict_before",
                       "collision_rate", "changed", "seconds"],
    "evaluated": ["stage", "split", "epoch", "metrics"],
    "probed": ["stage", "split", "epoch", "users", "probes"],  # SPEC section 8, learning probes
    "codebook_usage": ["stage", "epoch", "layer", "counts", "utilization", "perplexity", "gini", "dead_codes"],
    "checkpoint_saved": ["stage", "epoch", "path", "is_best"],
    "run_finished": ["stage", "best_metrics", "best_checkpoint", "seconds"],
}


@pytest.fixture
def lenient(monkeypatch):
    """Strict mode off (the suite turns it on) and a clean 'already reported' memory."""
    monkeypatch.delenv(signals.STRICT_ENV, raising=False)
    monkeypatch.setattr(signals, "_reported", set())


def fail(sender, **payload):
    raise ZeroDivisionError("broken subscriber")


def test_all_signals_cover_the_spec():
    assert {sig.name for sig in ALL_SIGNALS} == set(SPEC_PAYLOADS)


@pytest.mark.parametrize("sig", ALL_SIGNALS, ids=lambda s: s.name)
def test_signal_doc_names_every_payload_keyword(sig):
    payload_doc = sig.__doc__.split("Payload:", 1)[1]

    missing = [kw for kw in SPEC_PAYLOADS[sig.name] if not re.search(rf"\b{kw}\b", payload_doc)]
    assert not missing, f"{sig.name} doc does not name {missing}"


def test_receivers_are_called_in_connection_order():
    sig = BusSignal("ordered")
    calls = []
    receivers = [lambda sender, _n=n, **kw: calls.append(_n) for n in range(32)]
    order = list(range(32))
    random.Random(0).shuffle(order)  # neither creation nor address order
    with contextlib.ExitStack() as stack:
        for n in order:
            stack.enter_context(sig.connected_to(receivers[n]))

        results = sig.send(None)

    assert calls == order
    assert [r for r, _ in results] == [receivers[n] for n in order]


def test_receivers_get_the_sender_and_keyword_payload():
    sig = BusSignal("payload")
    got = []

    def receiver(sender, *, epoch, losses, **extra):
        got.append((sender, epoch, losses, extra))
        return "ok"
    with sig.connected_to(receiver):
        results = sig.send("trainer", epoch=3, losses={"total": 0.5}, lr={"rec": 1e-3})

    assert got == [("trainer", 3, {"total": 0.5}, {"lr": {"rec": 1e-3}})]
    assert results == [(receiver, "ok")]


def test_raising_receiver_does_not_stop_the_others(lenient):
    sig = BusSignal("isolated")
    calls = []

    def before(sender, **kw):
        calls.append("before")

    def after(sender, **kw):
        calls.append("after")
    with sig.connected_to(before), sig.connected_to(fail), sig.connected_to(after):
        results = sig.send(None, epoch=1)

    assert calls == ["before", "after"]
    assert [r for r, _ in results] == [before, after]


def test_receiver_error_is_logged_once_per_receiver_and_signal_with_traceback(lenient, caplog):
    first, second = BusSignal("first_signal"), BusSignal("second_signal")
    with first.connected_to(fail), second.connected_to(fail), caplog.at_level(logging.ERROR, "etegrec.signals"):
        for _ in range(3):
            first.send(None)
        second.send(None)

    records = [r for r in caplog.records if r.name == "etegrec.signals"]
    assert len(records) == 2
    assert ["first_signal" in r.getMessage() for r in records] == [True, False]
    assert all("test_signals.fail" in r.getMessage() for r in records)
    assert all(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in records)
    assert "broken subscriber" in caplog.text  # the traceback is in the log


def test_strict_context_manager_re_raises(lenient):
    sig = BusSignal("strict_cm")
    with sig.connected_to(fail), signals.strict(), pytest.raises(ZeroDivisionError, match="broken subscriber"):
        sig.send(None)


def test_strict_context_manager_ends_with_its_block(lenient):
    with signals.strict():
        assert signals.is_strict()

    assert not signals.is_strict()


@pytest.mark.parametrize(("value", "strict"), [("1", True), ("0", False), ("", False)])
def test_strict_env_var(monkeypatch, value, strict):
    monkeypatch.setenv(signals.STRICT_ENV, value)

    assert signals.is_strict() is strict


def test_strict_env_var_re_raises(monkeypatch):
    monkeypatch.setenv(signals.STRICT_ENV, "1")
    sig = BusSignal("strict_env")
    with sig.connected_to(fail), pytest.raises(ZeroDivisionError, match="broken subscriber"):
        sig.send(None)


def test_recording_records_name_sender_and_payload_in_order():
    sender = object()
    with recording(signals.epoch_end, signals.evaluated) as events:
        signals.epoch_end.send(sender, stage="rec", phase="rec", epoch=0, losses={"total": 1.0})
        signals.evaluated.send(sender, stage="rec", split="valid", epoch=0, metrics={"ndcg@10": 0.1})
        signals.epoch_end.send(sender, stage="rec", phase="rec", epoch=1, losses={"total": 0.5})

    assert events == [
        Emission("epoch_end", sender, {"stage": "rec", "phase": "rec", "epoch": 0, "losses": {"total": 1.0}}),
        Emission("evaluated", sender, {"stage": "rec", "split": "valid", "epoch": 0, "metrics": {"ndcg@10": 0.1}}),
        Emission("epoch_end", sender, {"stage": "rec", "phase": "rec", "epoch": 1, "losses": {"total": 0.5}}),
    ]


def test_recording_without_arguments_records_every_signal():
    with recording() as events:
        for sig in ALL_SIGNALS:
            sig.send(None)

    assert [e.signal for e in events] == [sig.name for sig in ALL_SIGNALS]


def test_recording_disconnects_afterwards():
    before = {sig.name: len(sig.receivers) for sig in ALL_SIGNALS}
    with recording() as events:
        assert all(len(sig.receivers) == before[sig.name] + 1 for sig in ALL_SIGNALS)

    signals.epoch_end.send(None, epoch=0)
    assert events == []
    assert {sig.name: len(sig.receivers) for sig in ALL_SIGNALS} == before


def test_send_without_receivers_returns_an_empty_list():
    assert BusSignal("nobody").send(object(), epoch=0, losses={"total": 1.0}) == []


def test_muted_signal_calls_no_receiver():
    sig = BusSignal("muted")
    calls = []

    def receiver(sender, **kw):
        calls.append(kw)
    with sig.connected_to(receiver), sig.muted():
        assert sig.send(None, epoch=0) == []

    assert calls == []
