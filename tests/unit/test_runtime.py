"""The runtime: workers run their step on signals, on what falls due, and retry failures."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from ota.api.health import HealthMonitor
from ota.errors import Unavailable
from ota.runtime import Backoff, Signal, Signals, Worker

WAIT = 30.0  # far inside the test timeout; never reached when the code works
NEVER = 3600.0  # an interval no test waits for: only a signal can run the step


class Ticker:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_up_to_its_cap_and_a_success_resets_it() -> None:
    backoff = Backoff(first=0.5, most=3.0)
    assert [backoff.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.failures == 5
    backoff.succeeded()
    assert (backoff.failed(), backoff.failures) == (0.5, 1)


def test_backoff_and_worker_refuse_nonsense_timing() -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=0, most=1)
    with pytest.raises(ValueError, match="interval"):
        Worker("x", lambda: None, interval=0)


def test_a_step_says_when_it_runs_again_bounded_by_the_interval() -> None:
    answers: list[float | None] = [None, 0.0, 4.0, 60.0, -1.0]
    worker = Worker("x", lambda: answers.pop(0), interval=10.0)
    pauses = [worker.run_once() for _ in range(5)]
    assert [p.seconds for p in pauses] == [10.0, 0.0, 4.0, 10.0, 0.0]
    assert all(p.wakeable for p in pauses)
    assert worker.runs == 5


def test_a_failing_step_backs_off_unwakeably_and_logs_once_per_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failures: list[Exception] = [Unavailable("database away"), RuntimeError("bug")]

    def step() -> None:
        if failures:
            raise failures.pop(0)

    worker = Worker("flaky", step, interval=10.0, backoff=Backoff(first=1.0, most=8.0))
    with caplog.at_level(logging.INFO, logger="ota.runtime.worker"):
        first, second, third = worker.run_once(), worker.run_once(), worker.run_once()
    assert (first.seconds, first.wakeable) == (1.0, False)
    assert (second.seconds, second.wakeable) == (2.0, False)
    assert (third.seconds, third.wakeable) == (10.0, True)  # recovered: back to the interval
    records = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert records[0] == ("WARNING", "flaky deferred, retrying in 1s: database away")
    assert records[1][0] == "ERROR" and records[1][1].startswith("flaky failed unexpectedly")
    assert caplog.records[1].exc_info is not None  # the traceback of the bug is kept
    assert len(records) == 2


def test_an_inactive_worker_skips_its_step() -> None:
    holds = False
    calls: list[int] = []
    worker = Worker("x", lambda: calls.append(1), interval=5.0, active=lambda: holds)
    assert worker.run_once().seconds == 5.0 and calls == []
    holds = True
    worker.run_once()
    assert calls == [1]


def test_min_gap_counts_from_the_last_run() -> None:
    ticker = Ticker()
    worker = Worker("x", lambda: None, interval=5.0, min_gap=0.5, monotonic=ticker)
    assert worker.gap_left() == 0.0  # never ran
    worker.run_once()
    ticker.now += 0.2
    assert worker.gap_left() == pytest.approx(0.3)
    ticker.now += 1.0
    assert worker.gap_left() == 0.0


class Steps:
    """A step that records each run and lets the test wait for the next one."""

    def __init__(self, during: Callable[[int], None] = lambda _n: None) -> None:
        self.count = 0
        self._ran = threading.Condition()
        self._during = during

    def __call__(self) -> None:
        with self._ran:
            self.count += 1
            n = self.count
        self._during(n)
        with self._ran:
            self._ran.notify_all()

    def wait_for(self, count: int) -> None:
        with self._ran:
            assert self._ran.wait_for(lambda: self.count >= count, WAIT), f"run {count} never came"


def test_a_signal_runs_the_step_at_once_and_stop_joins() -> None:
    signal = Signal("rollout changed")
    steps = Steps()
    # A wake_on signal is not held back by the gap that coalesces ingested progress.
    worker = Worker("x", steps, interval=NEVER, wake_on=[signal], min_gap=NEVER)
    worker.start()
    try:
        steps.wait_for(1)  # the first run is at start
        signal.emit()
        steps.wait_for(2)
        worker.wake()
        steps.wait_for(3)
    finally:
        worker.stop()
    assert worker.stopping
    count = steps.count
    signal.emit()  # a stopped worker runs nothing more
    assert steps.count == count


def test_a_signal_raised_during_the_step_runs_it_once_more() -> None:
    signal = Signal("desired committed")
    # The first run raises the signal itself, as a commit during a publish would.
    steps = Steps(during=lambda n: signal.emit() if n == 1 else None)
    worker = Worker("x", steps, interval=NEVER, wake_on=[signal])
    worker.start()
    try:
        steps.wait_for(2)
    finally:
        worker.stop()


def test_signal_counts_let_a_waiter_see_every_emit_and_a_bad_listener_harms_nobody() -> None:
    signal = Signal("progress ingested")
    heard: list[str] = []

    def broken() -> None:
        raise RuntimeError("listener bug")

    signal.connect(broken)
    signal.connect(lambda: heard.append("x"))
    seen = signal.count
    signal.emit()
    assert heard == ["x"]
    assert signal.wait(seen, timeout=WAIT) == seen + 1
    signals = Signals()
    names = [
        s.name
        for s in (
            signals.desired_committed,
            signals.rollout_changed,
            signals.progress_ingested,
            signals.lease_gained,
            signals.lease_lost,
        )
    ]
    assert len(set(names)) == 5


class FakeHealth:
    def __init__(self) -> None:
        self.serving: bool | None = None
        self.answers: list[bool] = []

    def set(self, serving: bool) -> None:
        self.serving = serving
        self.answers.append(serving)


def test_health_asks_the_database_every_few_seconds_at_once_after_an_error_and_while_down() -> None:
    ticker = Ticker()
    broker = True
    database = [True]
    asked: list[int] = []

    def database_up() -> bool:
        asked.append(1)
        return database[0]

    health = FakeHealth()
    monitor = HealthMonitor(
        health,  # type: ignore[arg-type]
        broker_up=lambda: broker,
        database_up=database_up,
        database_every=5.0,
        monotonic=ticker,
    )
    monitor.check()
    assert (health.serving, len(asked)) == (True, 1)
    ticker.now += 1
    monitor.check()
    assert len(asked) == 1  # not yet due
    database[0] = False
    monitor._on_database_error(None)  # a statement failed somewhere
    monitor.check()
    assert (health.serving, len(asked)) == (False, 2)
    ticker.now += 1
    database[0] = True
    monitor.check()  # while down, asked on every check
    assert (health.serving, len(asked)) == (True, 3)
    broker = False
    monitor.check()
    assert health.serving is False
    broker = True
    monitor.check()
    assert health.answers[-1] is True
