"""The per-device token bucket: bursts pass, floods are cut, other devices are untouched."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ota.errors import InvalidArgument
from ota.transport.ratelimit import DeviceRateLimit, DeviceRateLimiter


class Ticks:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limiter(rate: float = 2.0, burst: int = 5) -> tuple[DeviceRateLimiter, Ticks]:
    ticks = Ticks()
    limit = DeviceRateLimit(rate=rate, burst=burst, flag_seconds=30.0, log_interval=10.0)
    return DeviceRateLimiter(limit, monotonic=ticks), ticks


def test_a_burst_passes_then_the_excess_is_dropped_and_the_device_flagged() -> None:
    limiter, _ = _limiter()
    verdicts = [limiter.admit("car-1") for _ in range(8)]
    assert verdicts == [True] * 5 + [False] * 3
    assert limiter.dropped_if_flagged("car-1") == 3
    assert limiter.admit("car-2")  # another device has its own bucket
    assert limiter.dropped_if_flagged("car-2") is None


def test_tokens_refill_at_the_rate_and_the_flag_expires() -> None:
    limiter, ticks = _limiter()
    for _ in range(6):
        limiter.admit("car-1")
    ticks.now += 1.0  # two tokens back
    assert [limiter.admit("car-1") for _ in range(3)] == [True, True, False]
    ticks.now += 31.0
    assert limiter.dropped_if_flagged("car-1") is None
    assert limiter.admit("car-1")


def test_the_warning_names_the_device_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    limiter, ticks = _limiter(burst=1)
    with caplog.at_level(logging.WARNING, logger="ota.transport.ratelimit"):
        for _ in range(50):
            limiter.admit("car-9")
        ticks.now += 11.0
        for _ in range(50):
            limiter.admit("car-9")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("car-9" in line for line in lines)


def test_rate_zero_turns_the_limit_off() -> None:
    limiter, _ = _limiter(rate=0.0, burst=0)
    assert all(limiter.admit("car-1") for _ in range(10_000))


def test_nonsense_limits_are_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument) as err:
        DeviceRateLimit(rate=-1.0)
    assert err.value.field == "ingest_device_rate"
    with pytest.raises(InvalidArgument) as err:
        DeviceRateLimit(rate=5.0, burst=0)
    assert err.value.field == "ingest_device_burst"


@settings(max_examples=50, deadline=None)
@given(
    gaps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=200),
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 20),
)
def test_admitted_never_exceeds_burst_plus_rate_times_elapsed(
    gaps: list[float], rate: float, burst: int
) -> None:
    limiter, ticks = _limiter(rate=rate, burst=burst)
    start = ticks.now
    admitted = 0
    for gap in gaps:
        ticks.now += gap
        admitted += limiter.admit("car-1")
    assert admitted <= burst + rate * (ticks.now - start) + 1e-9


def test_admit_many_answers_each_message_of_a_batch_in_turn() -> None:
    limiter, ticks = _limiter(rate=1.0, burst=2)
    ids = ["a", "b", "a", "a", "b", "a"]
    assert limiter.admit_many(ids) == [True, True, True, False, True, False]
    ticks.now += 1.0  # one token back for each device
    assert limiter.admit_many(ids) == [True, True, False, False, False, False]
    flagged = limiter.flagged("a")
    assert flagged is not None and flagged.dropped == 5
