"""Storing device events: idempotent on (device_id, seq), never moving a device backwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Insert, Table, Update, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from ota.clock import utc
from ota.domain.durations import duration_bucket, time_bucket
from ota.domain.states import FUNNEL, RANK, SETTLED
from ota.store import adoption
from ota.store.models import (
    DeviceEventRow,
    DeviceRow,
    IngestDropRow,
    RolloutDeviceRow,
    RolloutRow,
)


@dataclass(frozen=True)
class HealthFigures:
    """A health sample a device sends after activation."""

    crashes: int
    feature_errors: int
    uptime_seconds: int


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
    health: HealthFigures | None = None


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
    firmware = dict(
        session.exec(
            select(DeviceRow.device_id, DeviceRow.firmware).where(
                col(DeviceRow.device_id).in_(device_ids)
            )
        ).all()
    )
    known_devices = set(firmware)
    rollout_ids = {e.rollout_id for e in events if e.rollout_id}
    known_rollouts = set(
        session.exec(
            select(RolloutRow.rollout_id).where(col(RolloutRow.rollout_id).in_(rollout_ids))
        )
    )
    accepted: list[IncomingEvent] = []
    batch_keys: set[tuple[str, int]] = set()
    for event in events:
        if event.device_id not in known_devices:
            dropped["unknown_device"] += 1
        elif event.rollout_id and event.rollout_id not in known_rollouts:
            dropped["unknown_rollout"] += 1
        elif (event.device_id, event.seq) in batch_keys:
            continue  # re-sent within one batch: a duplicate, like one already stored
        else:
            batch_keys.add((event.device_id, event.seq))
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
    deltas = adoption.AdoptionDeltas()
    _apply_progress(session, fresh, now, firmware, deltas)
    _attribute_health(session, fresh, now, deltas)
    adoption.write(session, deltas)
    count_drops(session, dropped)
    return IngestResult(len(fresh), len(events) - sum(dropped.values()) - len(fresh), dropped)


class _Progress(SimpleNamespace):
    """A progress row (`RolloutDeviceRow`) as plain attributes, read and written with Core.

    `dirty` names the columns this batch changed: only those are written back.
    """

    dirty: set[str]

    def params(self) -> dict[str, Any]:
        return {
            f"p_{name}": getattr(self, name) for name in ("rollout_id", "device_id", *self.dirty)
        }


_WRITTEN = (
    "state",
    "reason",
    "furthest_rank",
    "last_seq",
    "updated_at",
    "notified_at",
    "downloaded_at",
    "verified_at",
    "installed_at",
    "active_at",
)
_PROGRESS: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
_UPDATES: dict[frozenset[str], Update] = {}


def _update_progress(columns: frozenset[str]) -> Update:
    """UPDATE of exactly `columns`, one statement per set (few: the steps reached differ).

    Writing only what changed keeps the executemany's bound parameters, and
    their per-row type conversions (datetimes above all), to what is needed.
    """
    statement = _UPDATES.get(columns)
    if statement is None:
        statement = (
            update(_PROGRESS)
            .where(
                _PROGRESS.c.rollout_id == bindparam("p_rollout_id"),
                _PROGRESS.c.device_id == bindparam("p_device_id"),
            )
            .values({name: bindparam(f"p_{name}") for name in _WRITTEN if name in columns})
        )
        _UPDATES[columns] = statement
    return statement


# The progress row's column recording when a device first reached each step.
_STEP_TIMES = {
    "NOTIFIED": "notified_at",
    "DOWNLOADED": "downloaded_at",
    "VERIFIED": "verified_at",
    "INSTALLED": "installed_at",
    "ACTIVE": "active_at",
}
# A device clock further off than this is not trusted for step times.
_CLOCK_TOLERANCE = timedelta(hours=1)
_ALWAYS_WRITTEN = ("state", "furthest_rank", "last_seq", "updated_at")
# States after which the device runs a version of the feature (the event's version),
# or none at all.
_RUNS_VERSION = ("ACTIVE", "ROLLED_BACK")


def _apply_progress(
    session: Session,
    events: Sequence[IncomingEvent],
    now: datetime,
    firmware: dict[str, str],
    deltas: adoption.AdoptionDeltas,
) -> None:
    keys = {(e.rollout_id, e.device_id) for e in events if e.rollout_id}
    if not keys:
        return
    bucket = time_bucket(now)
    for e in events:
        if e.rollout_id:
            deltas.add(e.rollout_id, "events", "stored", (-1, "", "", ""), bucket=bucket)
    # Core, not the ORM: this runs for every event of the fleet (DESIGN §2).
    table: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
    # Two plain IN lists (a batch names few rollouts), not a tuple IN: cheaper to
    # bind, and the primary key still serves it. Pairs not asked for are skipped.
    query = (
        table.select()
        .where(
            table.c.rollout_id.in_(sorted({r for r, _ in keys})),
            table.c.device_id.in_(sorted({d for _, d in keys})),
        )
        # Replicas ingest one device's events concurrently (the shared subscription
        # splits them): lock its progress rows, always in one order, so neither
        # transaction overwrites the other's newer state with an older one.
        .order_by(table.c.rollout_id, table.c.device_id)
        .with_for_update()
    )
    result = session.execute(query)
    names = list(result.keys())
    progress: dict[tuple[str, str], _Progress] = {}
    for values in result:
        read = _Progress(**dict(zip(names, values, strict=True)), dirty=set())
        if (read.rollout_id, read.device_id) in keys:
            progress[(read.rollout_id, read.device_id)] = read
    changed: dict[tuple[str, str], _Progress] = {}
    features = {(e.device_id, e.feature) for e in events if e.feature}
    running = adoption.running_versions(session, features)
    for event in sorted(events, key=lambda e: e.seq):
        row = progress.get((event.rollout_id, event.device_id))
        if row is not None and event.health is not None:
            # A health sample is a fact whenever it arrives, late or not.
            cohort = (row.stage, row.model, row.region, firmware.get(event.device_id, ""))
            _count_health(
                row.rollout_id, adoption.HEALTH, cohort, event.health, now=now, deltas=deltas
            )
        if row is None or event.seq <= row.last_seq:
            # Not exposed by this rollout, or a late event: it is kept, but the
            # device's state only moves forward in its own sequence order.
            continue
        _count(
            row,
            event,
            now=now,
            firmware=firmware.get(event.device_id, ""),
            deltas=deltas,
            running=running,
        )
        row.last_seq = event.seq
        if event.state == "FAILED":
            # Kept after a later revert: the report still shows why it failed.
            row.reason = event.error_code
            row.dirty.add("reason")
        if not (event.state == "FAILED" and row.state in SETTLED):
            row.state = event.state
        row.furthest_rank = max(row.furthest_rank, RANK.get(event.state, 0))
        row.updated_at = now
        row.dirty.update(_ALWAYS_WRITTEN)
        changed[(row.rollout_id, row.device_id)] = row
    by_columns: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in changed.values():
        by_columns.setdefault(frozenset(row.dirty), []).append(row.params())
    for columns, params in by_columns.items():
        session.execute(_update_progress(columns), params)


def _attribute_health(
    session: Session,
    events: Sequence[IncomingEvent],
    now: datetime,
    deltas: adoption.AdoptionDeltas,
) -> None:
    """Count the periodic health samples (naming no rollout) for the rollouts they concern."""
    samples = [e for e in events if e.health is not None and not e.rollout_id]
    if not samples:
        return
    attribution = adoption.HealthAttribution(session, {e.device_id for e in samples})
    for event in samples:
        assert event.health is not None
        for target in attribution.targets(event.device_id, event.feature, event.version):
            _count_health(
                target.rollout_id,
                target.metric,
                target.cohort,
                event.health,
                now=now,
                deltas=deltas,
            )


def _count(
    row: _Progress,
    event: IncomingEvent,
    *,
    now: datetime,
    firmware: str,
    deltas: adoption.AdoptionDeltas,
    running: dict[tuple[str, str], str],
) -> None:
    """What this event changes in the aggregates (called before the row moves)."""
    cohort = (row.stage, row.model, row.region, firmware)
    rid = row.rollout_id
    when = event.device_time
    if when is None or abs(utc(when) - now) > _CLOCK_TOLERANCE:
        when = now
    when = utc(when)
    bucket = time_bucket(now)
    previous = utc(row.exposed_at)
    for step in FUNNEL[1:]:
        stamp = getattr(row, _STEP_TIMES[step])
        if stamp is not None:
            previous = utc(stamp)
        elif RANK[step] <= RANK.get(event.state, 0):
            at = max(when, previous)
            setattr(row, _STEP_TIMES[step], at)
            row.dirty.add(_STEP_TIMES[step])
            deltas.add(rid, "reached", step, cohort, bucket=bucket)
            step_seconds = (at - previous).total_seconds()
            deltas.add(rid, "step_time", step, cohort, bucket=duration_bucket(step_seconds))
            if step in ("INSTALLED", "ACTIVE"):
                total = (at - utc(row.exposed_at)).total_seconds()
                deltas.add(rid, "latency", step, cohort, bucket=duration_bucket(total))
            previous = at
    new_state = row.state if event.state == "FAILED" and row.state in SETTLED else event.state
    if new_state != row.state:
        if row.state != "TARGETED":
            deltas.add(rid, "state", row.state, cohort, value=-1)
        deltas.add(rid, "state", new_state, cohort)
        if new_state in ("FAILED", "ROLLED_BACK", "DEACTIVATED"):
            deltas.add(rid, "entered", new_state, cohort, bucket=bucket)
    if event.state == "FAILED" and event.error_code != row.reason:
        if row.reason:
            deltas.add(rid, "failed", row.reason, cohort, value=-1)
        deltas.add(rid, "failed", event.error_code, cohort)
    if event.feature and new_state != row.state:
        _count_version(event, new_state, bucket, deltas, running)


def _count_health(
    rid: str,
    metric: str,
    cohort: tuple[int, str, str, str],
    health: HealthFigures,
    *,
    now: datetime,
    deltas: adoption.AdoptionDeltas,
) -> None:
    """Add one sample to a rollout's health sums, in the minute it arrived."""
    bucket = time_bucket(now)
    deltas.add(rid, metric, "samples", cohort, bucket=bucket)
    deltas.add(rid, metric, "crashes", cohort, bucket=bucket, value=health.crashes)
    deltas.add(rid, metric, "feature_errors", cohort, bucket=bucket, value=health.feature_errors)
    if health.crashes or health.feature_errors:
        deltas.add(rid, metric, "unhealthy_samples", cohort, bucket=bucket)


def _count_version(
    event: IncomingEvent,
    state: str,
    bucket: int,
    deltas: adoption.AdoptionDeltas,
    running: dict[tuple[str, str], str],
) -> None:
    if state in _RUNS_VERSION:
        now_running = event.version
    elif state == "DEACTIVATED":
        now_running = ""
    else:
        return
    key = (event.device_id, event.feature)
    before = running.get(key, "")
    if before == now_running:
        return
    if before:
        deltas.versions[(event.feature, before, bucket)] -= 1
    if now_running:
        deltas.versions[(event.feature, now_running, bucket)] += 1
    running[key] = now_running
    deltas.running[key] = now_running


def count_drops(session: Session, dropped: Counter[str]) -> None:
    for reason, n in dropped.items():
        row = session.get(IngestDropRow, reason) or IngestDropRow(reason=reason, count=0)
        row.count += n
        session.add(row)


def drop_counts(session: Session) -> dict[str, int]:
    return {row.reason: row.count for row in session.exec(select(IngestDropRow))}
