"""Broken transfers: bounded retries with jittered exponential backoff, resumed from the last byte."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError

from ota.cli.watch import Reconnect
from ota.device.retry import ControlPlaneUnreachable, Fault, RetryPolicy, Unreachable, classify
from ota.device.source import Deadlines
from ota.errors import InvalidArgument, VerificationError
from tests.unit.test_device_sim import World, assigned, bundle


def test_pauses_grow_exponentially_with_jitter_and_a_ceiling() -> None:
    policy = RetryPolicy(attempts=10, first_delay=0.5, max_delay=8.0)
    rng = random.Random(3)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        pauses = [policy.delay(failures, rng) for _ in range(200)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses), (failures, pauses)
        assert len(set(pauses)) > 100  # jittered, so a fleet does not retry in step
    assert policy.delay(10_000, rng) <= 8.0  # no overflow far out


def test_a_retry_policy_refuses_nonsense() -> None:
    with pytest.raises(InvalidArgument):
        RetryPolicy(attempts=0)
    with pytest.raises(InvalidArgument):
        RetryPolicy(first_delay=5.0, max_delay=1.0)
    with pytest.raises(InvalidArgument):
        RetryPolicy(first_delay=-1.0)
    with pytest.raises(InvalidArgument):
        RetryPolicy(unreachable_for=-1.0)


class FakeTime:
    """Monotonic seconds that only pauses advance: a retry loop runs in no time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def policy(self, **kwargs: Any) -> RetryPolicy:
        return RetryPolicy(sleep=self.sleep, clock=lambda: self.now, **kwargs)


def test_call_retries_broken_calls_and_gives_up_after_the_attempts() -> None:
    t = FakeTime()
    policy = t.policy(attempts=3, first_delay=0.2)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("garbled answer")
        return "ok"

    assert policy.call("x", flaky, random.Random(1), permanent=LookupError) == "ok"
    assert len(t.sleeps) == 2

    def broken() -> str:
        raise RuntimeError("still garbled")

    with pytest.raises(RuntimeError, match="still garbled"):
        policy.call("x", broken, random.Random(1), permanent=LookupError)

    def refused() -> str:
        calls.append(1)
        raise KeyError("no such thing")

    calls.clear()
    with pytest.raises(KeyError):
        policy.call("x", refused, random.Random(1), permanent=LookupError)
    assert len(calls) == 1  # a permanent error is not retried


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("refused"),
        ConnectionResetError("reset"),
        Unreachable("UNAVAILABLE: failed to connect"),
        TimeoutError("no answer"),
    ],
)
def test_an_unreachable_control_plane_is_waited_for_minutes_not_attempts(
    error: Exception,
) -> None:
    t = FakeTime()
    policy = t.policy(attempts=3, first_delay=0.5, max_delay=8.0, unreachable_for=120.0)
    calls: list[float] = []

    def down_for_100s() -> str:
        calls.append(t.now)
        if t.now < 100.0:
            raise error
        return "back"

    assert policy.call("metadata", down_for_100s, random.Random(2), permanent=LookupError) == "back"
    assert len(calls) > policy.attempts  # a restart is not a broken transfer
    assert max(t.sleeps) <= 8.0  # and backs off, jittered, up to its ceiling
    assert t.sleeps[:4] == sorted(t.sleeps[:4])


def test_an_unreachable_control_plane_is_given_up_on_time_with_a_reason_of_its_own() -> None:
    t = FakeTime()
    policy = t.policy(first_delay=0.5, max_delay=8.0, unreachable_for=60.0)

    def down() -> str:
        raise ConnectionRefusedError("refused")

    with pytest.raises(ControlPlaneUnreachable, match="unreachable for 60s"):
        policy.call("metadata", down, random.Random(3), permanent=LookupError)
    assert t.now == pytest.approx(60.0)  # the last pause ends at the window, not past it
    # python-tuf passes a DownloadError through unchanged, so the reason survives it.
    assert issubclass(ControlPlaneUnreachable, DownloadError)


def test_progress_ends_a_wait_and_the_backoff() -> None:
    t = FakeTime()
    retries = t.policy(first_delay=1.0, max_delay=30.0, unreachable_for=10.0).tracker(
        "download", random.Random(4)
    )
    for _ in range(3):
        retries.failed(ConnectionResetError("reset"))
    assert 2.0 <= t.sleeps[-1] <= 4.0
    assert t.now < 10.0
    retries.progressed()  # bytes arrived: the control plane is back
    retries.failed(ConnectionResetError("reset again"))
    assert 0.5 <= t.sleeps[-1] <= 1.0  # backoff starts over
    t.now += 9.0  # a new wait: 9 s of it is not yet the 10 s window
    retries.failed(ConnectionResetError("reset"))
    with pytest.raises(ControlPlaneUnreachable):
        t.now += 5.0
        retries.failed(ConnectionResetError("reset"))


def test_broken_calls_count_attempts_and_unreachable_ones_do_not() -> None:
    t = FakeTime()
    retries = t.policy(attempts=3, unreachable_for=1000.0).tracker("download", random.Random(5))
    for _ in range(20):
        retries.failed(Unreachable("UNAVAILABLE"))
    retries.failed(RuntimeError("DEADLINE_EXCEEDED while bytes trickled"))
    retries.failed(RuntimeError("DEADLINE_EXCEEDED while bytes trickled"))
    with pytest.raises(RuntimeError):
        retries.failed(RuntimeError("DEADLINE_EXCEEDED while bytes trickled"))


def test_faults_are_classified_by_what_a_retry_can_change() -> None:
    assert classify(Unreachable("UNAVAILABLE")) is Fault.UNREACHABLE
    assert classify(ConnectionRefusedError()) is Fault.UNREACHABLE
    assert classify(ConnectionResetError()) is Fault.UNREACHABLE
    assert classify(TimeoutError()) is Fault.UNREACHABLE
    assert classify(RuntimeError("odd answer")) is Fault.BROKEN
    assert classify(DownloadHTTPError("NOT_FOUND", 404)) is Fault.FINAL
    assert classify(DownloadLengthMismatchError("endless")) is Fault.FINAL
    assert classify(ControlPlaneUnreachable("gave up")) is Fault.FINAL


def test_a_final_refusal_is_raised_at_once() -> None:
    t = FakeTime()
    retries = t.policy().tracker("download", random.Random(6))
    with pytest.raises(DownloadHTTPError):
        retries.failed(DownloadHTTPError("PERMISSION_DENIED: revoked", 403))
    assert t.sleeps == []


def test_a_download_deadline_grows_with_what_is_asked() -> None:
    deadlines = Deadlines(download_base=2.0, download_min_rate=1000)
    assert deadlines.download(0) == 2.0
    assert deadlines.download(5000) == 7.0
    with pytest.raises(InvalidArgument):
        Deadlines(download_min_rate=0)


def test_endless_data_is_cut_at_the_signed_length_without_a_retry(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        a = world.repo.publish("1.0")
        world.source.endless = True
        with pytest.raises(VerificationError) as err:
            world.boot().trust.fetch_bundle(a)
        assert err.value.reason == "LENGTH_MISMATCH"
        assert len(world.source.target_calls) == 1
        assert world.sleeps == []
        assert list((world.state_dir / "downloads").iterdir()) == []
    finally:
        world.close()


def test_a_permanent_refusal_is_not_retried(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        a = world.repo.publish("1.0")
        world.source.failure = DownloadHTTPError("PERMISSION_DENIED: revoked", 403)
        with pytest.raises(VerificationError) as err:
            world.boot().trust.fetch_bundle(a)
        assert err.value.reason == "DOWNLOAD_FAILED"
        assert len(world.source.target_calls) == 1
    finally:
        world.close()


def test_metadata_fetches_are_retried_too(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        a = assigned(world.repo.publish("1.0"), "r-1")
        world.source.metadata_failures = 2
        path = world.boot().trust.fetch_bundle(a)
        assert path.read_bytes() == bundle("1.0")
        assert len(world.sleeps) == 2
    finally:
        world.close()


def test_a_stream_cut_after_its_last_byte_needs_no_retry(tmp_path: Path) -> None:
    world = World(tmp_path)
    try:
        a = world.repo.publish("1.0")
        world.source.cuts = [len(bundle("1.0"))]
        path = world.boot().trust.fetch_bundle(a)
        assert path.read_bytes() == bundle("1.0")
        assert len(world.source.target_calls) == 1
    finally:
        world.close()


def test_watch_reconnects_with_growing_jittered_pauses_until_its_time_is_up() -> None:
    now = [0.0]
    reconnect = Reconnect(30.0, clock=lambda: now[0], rng=random.Random(7))
    pauses: list[float] = []
    while (pause := reconnect.next_pause()) is not None:
        pauses.append(pause)
        now[0] += pause
    assert now[0] == pytest.approx(30.0)  # gave up on time, not before
    assert pauses[0] <= 0.5 and max(pauses) <= 5.0
    assert len(pauses) > 6
    reconnect.heard()  # the server answered: a later outage gets the whole time again
    assert not reconnect.lost and reconnect.next_pause() is not None
