"""Storing device events: idempotent on (device_id, seq), never moving a device backwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Insert, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from ota.domain.states import RANK, SETTLED
from ota.store.models import (
    DeviceEventRow,
    DeviceRow,
    IngestDropRow,
    RolloutDeviceRow,
    RolloutRow,
)


@dataclass(frozen=True)
class IncomingEvent:
    device_id: str
    seq: int
    rollout_id: str
    feature: str
    version: str
    state: str
    error_code: str
    detail: str
    bundle_sha256: str
    device_time: datetime | None


@dataclass(frozen=True)
class IngestResult:
    stored: int
    duplicates: int
    dropped: Counter[str]


def _insert(session: Session) -> Insert:
    table = DeviceEventRow.__table__  # type: ignore[attr-defined]
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(constraint="uq_device_event_seq")
    return sqlite.insert(table).on_conflict_do_nothing(index_elements=["device_id", "seq"])


def ingest_events(session: Session, events: Sequence[IncomingEvent], now: datetime) -> IngestResult:
    """Store new events and apply them to rollout progress, in the caller's transaction."""
    dropped: Counter[str] = Counter()
    device_ids = {e.device_id for e in events}
    known_devices = set(
        session.exec(select(DeviceRow.device_id).where(col(DeviceRow.device_id).in_(device_ids)))
    )
    rollout_ids = {e.rollout_id for e in events if e.rollout_id}
    known_rollouts = set(
        session.exec(
            select(RolloutRow.rollout_id).where(col(RolloutRow.rollout_id).in_(rollout_ids))
        )
    )
    accepted: list[IncomingEvent] = []
    for event in events:
        if event.device_id not in known_devices:
            dropped["unknown_device"] += 1
        elif event.rollout_id and event.rollout_id not in known_rollouts:
            dropped["unknown_rollout"] += 1
        else:
            accepted.append(event)
    if not accepted:
        count_drops(session, dropped)
        return IngestResult(0, 0, dropped)

    rows = [
        {
            "device_id": e.device_id,
            "seq": e.seq,
            "rollout_id": e.rollout_id,
            "feature": e.feature,
            "version": e.version,
            "state": e.state,
            "error_code": e.error_code,
            "detail": e.detail[:500],
            "bundle_sha256": e.bundle_sha256,
            "device_time": e.device_time,
            "received_at": now,
        }
        for e in accepted
    ]
    inserted = {
        (r.device_id, r.seq)
        for r in session.execute(
            _insert(session).returning(col(DeviceEventRow.device_id), col(DeviceEventRow.seq)),
            rows,
        )
    }
    fresh = [e for e in accepted if (e.device_id, e.seq) in inserted]
    _apply_progress(session, fresh, now)
    count_drops(session, dropped)
    return IngestResult(len(fresh), len(accepted) - len(fresh), dropped)


def _apply_progress(session: Session, events: Sequence[IncomingEvent], now: datetime) -> None:
    keys = {(e.rollout_id, e.device_id) for e in events if e.rollout_id}
    if not keys:
        return
    query = select(RolloutDeviceRow).where(
        tuple_(col(RolloutDeviceRow.rollout_id), col(RolloutDeviceRow.device_id)).in_(list(keys))
    )
    progress = {(r.rollout_id, r.device_id): r for r in session.exec(query)}
    for event in sorted(events, key=lambda e: e.seq):
        row = progress.get((event.rollout_id, event.device_id))
        if row is None or event.seq <= row.last_seq:
            # Not exposed by this rollout, or a late event: it is kept, but the
            # device's state only moves forward in its own sequence order.
            continue
        row.last_seq = event.seq
        if event.state == "FAILED":
            # Kept after a later revert: the report still shows why it failed.
            row.reason = event.error_code
        if not (event.state == "FAILED" and row.state in SETTLED):
            row.state = event.state
        row.furthest_rank = max(row.furthest_rank, RANK.get(event.state, 0))
        row.updated_at = now
        session.add(row)


def count_drops(session: Session, dropped: Counter[str]) -> None:
    for reason, n in dropped.items():
        row = session.get(IngestDropRow, reason) or IngestDropRow(reason=reason, count=0)
        row.count += n
        session.add(row)


def drop_counts(session: Session) -> dict[str, int]:
    return {row.reason: row.count for row in session.exec(select(IngestDropRow))}
