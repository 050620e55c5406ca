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
    nanos = getattr(ts, "nanos", 0)
    # Sub-second device times order a device's steps; nanos out of range (a bad
    # payload) are ignored rather than trusted.
    micros = nanos // 1000 if 0 <= nanos < 1_000_000_000 else 0
    try:
        return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
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
    # Each field is read once: every read of a protobuf field builds a new Python object.
    device_id, seq = event.device_id, event.seq
    if device_id != topic_device_id:
        raise Dropped("device_mismatch", f"event for {device_id!r} on {topic_device_id!r}'s topic")
    if not 0 < seq < MAX_SEQ:
        raise Dropped("malformed", f"event from {topic_device_id} with seq {seq}")
    text = {
        "rollout_id": event.rollout_id,
        "feature": event.feature,
        "version": event.version,
        "detail": event.detail,
    }
    _check_text(text, topic_device_id)
    health = _health(event, topic_device_id)
    state = _STATES.get(event.state)
    if state is None:
        raise Dropped("malformed", f"unknown state {event.state} from {topic_device_id}")
    reason = _REASONS.get(event.error_code) if event.error_code else ""
    if reason is None:
        raise Dropped("malformed", f"unknown reason {event.error_code} from {topic_device_id}")
    return IncomingEvent(
        device_id=device_id,
        seq=seq,
        rollout_id=text["rollout_id"],
        feature=text["feature"],
        version=text["version"],
        state=state,
        error_code=reason,
        detail=text["detail"],
        bundle_sha256=event.bundle_sha256.hex(),
        device_time=_timestamp(event.time),
        health=health,
    )


def _health(event: common_pb2.DeviceEvent, topic_device_id: str) -> HealthFigures | None:
    if not event.HasField("health"):
        return None
    sample = event.health
    figures = HealthFigures(
        sample.crash_count, sample.feature_error_count, sample.uptime_seconds, sample.uses
    )
    if max(figures.crashes, figures.feature_errors, figures.uses) > MAX_HEALTH_COUNT:
        raise Dropped("malformed", f"implausible health counts from {topic_device_id}")
    return figures


def _check_text(text: dict[str, str], topic_device_id: str) -> None:
    for name, width in MAX_TEXT.items():
        if len(text[name]) > width:
            raise Dropped("malformed", f"{name} longer than {width} from {topic_device_id}")
    for name, value in text.items():
        # Valid UTF-8, yet no SQL text column can store it.
        if "\x00" in value:
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


# Wire numbers of the states and failure reasons the store knows, with their names.
_STATES = {n: name for name, n in common_pb2.DeviceState.items() if name in ALL_STATES}
_REASONS = {n: name for name, n in common_pb2.FailureReason.items() if name in FAILURE_REASONS}
