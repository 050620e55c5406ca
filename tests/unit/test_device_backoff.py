"""Broken transfers: bounded retries with jittered exponential backoff, resumed from the last byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError

from device_sim.source import Deadlines
from ota.errors import InvalidArgument, VerificationError
from ota.trust.device import RetryPolicy
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


def test_call_retries_transient_errors_and_gives_up_after_the_attempts() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(attempts=3, first_delay=0.2, sleep=sleeps.append)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert policy.call("x", flaky, random.Random(1), permanent=LookupError) == "ok"
    assert len(sleeps) == 2

    def broken() -> str:
        raise ConnectionError("still down")

    calls.clear()
    with pytest.raises(ConnectionError, match="still down"):
        policy.call("x", broken, random.Random(1), permanent=LookupError)

    def refused() -> str:
        calls.append(1)
        raise KeyError("no such thing")

    calls.clear()
    with pytest.raises(KeyError):
        policy.call("x", refused, random.Random(1), permanent=LookupError)
    assert len(calls) == 1  # a permanent error is not retried


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
