"""Decoding device payloads; every way a payload can be bad has a drop reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from ota.domain.states import ALL_STATES, FAILURE_REASONS
from ota.store.ingest import HealthFigures, IncomingEvent
from ota.v1 import common_pb2

# Sequence numbers are refused from 2^31 on (decades of any honest device), although
# the columns are 64-bit: one absurd seq would otherwise leave the device's later,
# honest events looking old.
MAX_SEQ = 2**31
# Crashes or errors counted in one health sample; more is not a measurement, and
# the sums they feed are 32-bit integers on PostgreSQL.
MAX_HEALTH_COUNT = 1_000_000
# The widths of the store's columns for an event's text: a longer value would make
# PostgreSQL refuse the whole batch, so it is a malformed event instead.
MAX_TEXT = {"rollout_id": 32, "feature": 64, "version": 32}


class Dropped(Exception):
    """A device message that is acknowledged, counted under `reason` and not stored."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ReportedPresence:
    device_id: str
    online: bool
    time: datetime


def _timestamp(ts: object) -> datetime | None:
    seconds = getattr(ts, "seconds", 0)
    if not seconds:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def decode_event(topic_device_id: str, payload: bytes, *, max_bytes: int) -> IncomingEvent:
    if len(payload) > max_bytes:
        raise Dropped("oversized", f"{len(payload)} bytes from {topic_device_id}")
    event = common_pb2.DeviceEvent()
    try:
        event.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise Dropped("malformed", f"undecodable event from {topic_device_id}: {exc}") from exc
    if event.device_id != topic_device_id:
        raise Dropped(
            "device_mismatch", f"event for {event.device_id!r} on {topic_device_id!r}'s topic"
        )
    if not 0 < event.seq < MAX_SEQ:
        raise Dropped("malformed", f"event from {topic_device_id} with seq {event.seq}")
    _check_text(event, topic_device_id)
    if event.HasField("health") and (
        max(event.health.crash_count, event.health.feature_error_count) > MAX_HEALTH_COUNT
    ):
        raise Dropped("malformed", f"implausible health counts from {topic_device_id}")
    state = common_pb2.DeviceState.Name(event.state) if event.state in _STATE_NUMBERS else ""
    if state not in ALL_STATES:
        raise Dropped("malformed", f"unknown state {event.state} from {topic_device_id}")
    reason = ""
    if event.error_code:
        if event.error_code not in _REASON_NUMBERS:
            raise Dropped("malformed", f"unknown reason {event.error_code} from {topic_device_id}")
        reason = common_pb2.FailureReason.Name(event.error_code)
        if reason not in FAILURE_REASONS:
            raise Dropped("malformed", f"unknown reason {reason} from {topic_device_id}")
    return IncomingEvent(
        device_id=event.device_id,
        seq=event.seq,
        rollout_id=event.rollout_id,
        feature=event.feature,
        version=event.version,
        state=state,
        error_code=reason,
        detail=event.detail,
        bundle_sha256=event.bundle_sha256.hex(),
        device_time=_timestamp(event.time),
        health=(
            HealthFigures(
                event.health.crash_count,
                event.health.feature_error_count,
                event.health.uptime_seconds,
            )
            if event.HasField("health")
            else None
        ),
    )


def _check_text(event: common_pb2.DeviceEvent, topic_device_id: str) -> None:
    for name, width in MAX_TEXT.items():
        if len(getattr(event, name)) > width:
            raise Dropped("malformed", f"{name} longer than {width} from {topic_device_id}")
    for name in (*MAX_TEXT, "detail"):
        # Valid UTF-8, yet no SQL text column can store it.
        if "\x00" in getattr(event, name):
            raise Dropped("malformed", f"NUL character in {name} from {topic_device_id}")


def decode_presence(topic_device_id: str, payload: bytes, *, max_bytes: int) -> ReportedPresence:
    if len(payload) > max_bytes:
        raise Dropped("oversized", f"{len(payload)} bytes from {topic_device_id}")
    state = common_pb2.ReportedState()
    try:
        state.ParseFromString(payload)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise Dropped("malformed", f"undecodable state from {topic_device_id}: {exc}") from exc
    if state.device_id != topic_device_id:
        raise Dropped("device_mismatch", f"state for {state.device_id!r} on {topic_device_id!r}")
    return ReportedPresence(
        state.device_id, state.online, _timestamp(state.time) or datetime.now(UTC)
    )


_STATE_NUMBERS = set(common_pb2.DeviceState.values())
_REASON_NUMBERS = set(common_pb2.FailureReason.values())
