"""Fuzzing the device payload decoders: every input is either a clean event or a counted drop.

A device (or anybody holding its credentials) controls every byte it publishes.
Whatever arrives, `decode_event` and `decode_presence` return a value the store
accepts or raise `Dropped` with a known reason: never another exception, never a
value that would make the database refuse the whole batch.
"""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ota.domain.states import ALL_STATES
from ota.transport.codec import (
    MAX_HEALTH_COUNT,
    MAX_SEQ,
    MAX_TEXT,
    Dropped,
    decode_event,
    decode_presence,
)
from ota.v1 import common_pb2

DEVICE = "car-1"
LIMIT = 64 * 1024
REASONS = {"malformed", "oversized", "device_mismatch"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=80)
events = st.builds(
    common_pb2.DeviceEvent,
    device_id=st.sampled_from([DEVICE, "car-2", "", "car-1\x00"]),
    seq=st.one_of(
        st.integers(0, 2**64 - 1), st.integers(1, 100), st.sampled_from([2**31 - 1, 2**31])
    ),
    rollout_id=text,
    bundle_sha256=st.binary(max_size=40),
    state=st.integers(0, 20),
    error_code=st.integers(0, 20),
    detail=st.text(max_size=600),
    feature=text,
    version=text,
    health=st.one_of(
        st.none(),
        st.builds(
            common_pb2.HealthSample,
            crash_count=st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 3)),
            feature_error_count=st.integers(0, 2**32 - 1),
            uptime_seconds=st.integers(0, 2**64 - 1),
        ),
    ),
)


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf[: cut % (len(buf) + 1)] if cut >= 0 else buf) + tail


def _check_event(payload: bytes) -> None:
    try:
        event = decode_event(DEVICE, payload, max_bytes=LIMIT)
    except Dropped as drop:
        assert drop.reason in REASONS
        assert str(drop)  # a reason and a detail for the log line
        return
    assert event.device_id == DEVICE
    assert 0 < event.seq < MAX_SEQ
    assert event.state in ALL_STATES
    for name, width in MAX_TEXT.items():
        value = getattr(event, name)
        assert len(value) <= width and "\x00" not in value, name
    assert "\x00" not in event.detail
    if event.health is not None:
        assert max(event.health.crashes, event.health.feature_errors) <= MAX_HEALTH_COUNT


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_are_dropped_or_decoded(payload: bytes) -> None:
    _check_event(payload)


@FUZZ
@given(
    events,
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.integers(-1, 400),
    st.binary(max_size=12),
)
def test_mutated_valid_events_are_dropped_or_decoded(
    event: common_pb2.DeviceEvent, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    _check_event(_mutate(event.SerializeToString(), flips, cut, tail))


@FUZZ
@given(events)
def test_well_formed_events_keep_the_topics_device(event: common_pb2.DeviceEvent) -> None:
    _check_event(event.SerializeToString())


@FUZZ
@given(
    st.builds(
        common_pb2.ReportedState,
        device_id=st.sampled_from([DEVICE, "car-2", ""]),
        online=st.booleans(),
        generation=st.integers(0, 2**64 - 1),
        time=st.builds(Timestamp, seconds=st.integers(-(2**62), 2**62)),
    ),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
    st.integers(-1, 200),
)
def test_presence_reports_are_dropped_or_decoded(
    state: common_pb2.ReportedState, flips: list[tuple[int, int]], cut: int
) -> None:
    payload = _mutate(state.SerializeToString(), flips, cut, b"")
    try:
        presence = decode_presence(DEVICE, payload, max_bytes=LIMIT)
    except Dropped as drop:
        assert drop.reason in REASONS
        return
    assert presence.device_id == DEVICE
    assert presence.time.tzinfo is not None


def test_oversized_payloads_are_dropped_before_parsing() -> None:
    event = common_pb2.DeviceEvent(device_id=DEVICE, seq=1, state=common_pb2.NOTIFIED)
    payload = event.SerializeToString() + b"\x00" * LIMIT
    for decode in (decode_event, decode_presence):
        with pytest.raises(Dropped) as drop:
            decode(DEVICE, payload, max_bytes=LIMIT)
        assert drop.value.reason == "oversized"


@pytest.mark.parametrize(
    "fields",
    [
        {"feature": "f" * 65},
        {"version": "9" * 33},
        {"rollout_id": "r" * 33},
        {"feature": "nav\x00"},
        {"detail": "boom\x00"},
        {"version": "1.0\x00"},
    ],
)
def test_text_the_store_cannot_hold_is_dropped_as_malformed(fields: dict[str, str]) -> None:
    # Regression: PostgreSQL refuses NUL characters and over-long values in its
    # columns, so such an event used to fail the whole ingest batch.
    event = common_pb2.DeviceEvent(device_id=DEVICE, seq=3, state=common_pb2.ACTIVE, **fields)
    with pytest.raises(Dropped) as drop:
        decode_event(DEVICE, event.SerializeToString(), max_bytes=LIMIT)
    assert drop.value.reason == "malformed"
    assert next(iter(fields)) in str(drop.value)
