"""Storing device events: idempotent on (device_id, seq), never moving a device backwards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table
from sqlmodel import Session, select

from ota.clock import utc
from ota.domain.durations import duration_bucket, time_bucket
from ota.domain.progress import Standing, advance, applies, counted_failure, furthest_rank
from ota.domain.states import FUNNEL, RANK
from ota.store import adoption, changes
from ota.store.models import IngestDropRow, RolloutDeviceRow
from ota.store.plain_sql import PlainSQL, TimeConversion, padded


@dataclass(frozen=True)
class HealthFigures:
    """A health sample a device sends after activation."""

    crashes: int
    feature_errors: int
    uptime_seconds: int
    uses: int = 0  # how often the feature was used since the previous sample


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
    # Rollouts with newly stored events (their progress counters moved): what
    # the engine and the read model react to.
    progressed: frozenset[str] = frozenset()


# The columns of `device_event` an event fills, in the order its INSERT binds them.
_EVENT_COLUMNS = (
    "device_id",
    "seq",
    "rollout_id",
    "feature",
    "version",
    "state",
    "error_code",
    "detail",
    "bundle_sha256",
    "device_time",
    "received_at",
)
# Rows per INSERT or UPDATE: 11 parameters each stays well under SQLite's 32 766
# and PostgreSQL's 65 535 parameters per statement, whatever the configured batch
# size. A power of two, as `padded` makes the row counts.
_STATEMENT_ROWS = 512
_PROGRESS: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]


def ingest_events(session: Session, events: Sequence[IncomingEvent], now: datetime) -> IngestResult:
    """Store new events and apply them to rollout progress, in the caller's transaction."""
    sql = PlainSQL(session)
    times = TimeConversion(_PROGRESS.c.updated_at, session)
    dropped: Counter[str] = Counter()
    device_ids = padded(sorted({e.device_id for e in events}))
    firmware: dict[str, str] = dict(
        sql.select(
            ("device_id", "firmware"),
            f"FROM device WHERE device_id IN ({sql.markers(len(device_ids))})",
            device_ids,
        )
    )
    rollout_ids = padded(sorted({e.rollout_id for e in events if e.rollout_id}))
    known_rollouts = (
        {
            r
            for (r,) in sql.rows(
                f"SELECT rollout_id FROM rollout WHERE rollout_id IN ({sql.markers(len(rollout_ids))})",
                rollout_ids,
            )
        }
        if rollout_ids
        else set()
    )
    accepted: list[IncomingEvent] = []
    batch_keys: set[tuple[str, int]] = set()
    for event in events:
        if event.device_id not in firmware:
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

    inserted = _insert_new(sql, times, accepted, now)
    fresh = [e for e in accepted if (e.device_id, e.seq) in inserted]
    progressed = frozenset(e.rollout_id for e in fresh if e.rollout_id)
    for rollout_id in progressed:
        changes.rollout_changed(session, rollout_id)  # its progress counters moved
    deltas = adoption.AdoptionDeltas(now)
    _apply_progress(session, fresh, now, sql=sql, times=times, firmware=firmware, deltas=deltas)
    _attribute_health(session, fresh, now, deltas)
    adoption.write(session, deltas)
    count_drops(session, dropped)
    return IngestResult(
        len(fresh), len(events) - sum(dropped.values()) - len(fresh), dropped, progressed
    )


def _insert_new(
    sql: PlainSQL, times: TimeConversion, events: Sequence[IncomingEvent], now: datetime
) -> set[tuple[str, int]]:
    """Insert the events not stored yet; the (device_id, seq) of those this call inserted.

    ON CONFLICT DO NOTHING with RETURNING names exactly the rows this transaction
    inserted, also when another replica stores the same event at the same time:
    only those count in the aggregates.
    """
    received_at = times.to_db(now)
    row = f"({sql.markers(len(_EVENT_COLUMNS))})"
    inserted: set[tuple[str, int]] = set()
    for start in range(0, len(events), _STATEMENT_ROWS):
        chunk = padded(events[start : start + _STATEMENT_ROWS])
        params = [
            value
            for e in chunk
            for value in (
                e.device_id,
                e.seq,
                e.rollout_id,
                e.feature,
                e.version,
                e.state,
                e.error_code,
                e.detail[:500],
                e.bundle_sha256,
                times.to_db(e.device_time),
                received_at,
            )
        ]
        inserted.update(
            (device_id, seq)
            for device_id, seq in sql.rows(
                f"INSERT INTO device_event ({', '.join(_EVENT_COLUMNS)}) "
                f"VALUES {', '.join([row] * len(chunk))} "
                "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq",
                params,
            )
        )
    return inserted


@dataclass(slots=True)
class _Progress:
    """A progress row (`RolloutDeviceRow`), as the driver returns it.

    Built positionally from each row read, which is cheaper than by name.
    Datetimes stay in the database's form until used (most events use none):
    `TimeConversion.from_db` reads them, and what this batch sets is a datetime.
    `dirty` names the columns this batch changed: only those are written back.
    """

    rollout_id: str
    device_id: str
    model: str
    region: str
    stage: int
    state: str
    reason: str
    furthest_rank: int
    last_seq: int
    exposed_at: Any
    updated_at: Any
    notified_at: Any
    downloaded_at: Any
    verified_at: Any
    installed_at: Any
    active_at: Any
    dirty: set[str] = field(default_factory=set)

    def params(self, columns: Sequence[str], times: TimeConversion) -> tuple[Any, ...]:
        """The UPDATE's parameters: `columns`, then the key."""
        values = [getattr(self, name) for name in columns]
        return (
            *(
                times.to_db(v) if name in _TIME_COLUMNS else v
                for name, v in zip(columns, values, strict=True)
            ),
            self.rollout_id,
            self.device_id,
        )


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


def _write_progress(
    sql: PlainSQL, columns: Sequence[str], params: Sequence[tuple[Any, ...]]
) -> None:
    """UPDATE exactly `columns` of the rows `params` name (`columns`' values, then the key).

    One statement per set of columns (few: the steps reached differ). Writing only
    what changed keeps the parameters, and the datetime conversions among them, to
    what is needed.
    """
    if sql.postgresql:
        assignments = ", ".join(f"{name} = {sql.marker}" for name in columns)
        sql.execute_many(
            f"UPDATE rollout_device SET {assignments} "
            f"WHERE rollout_id = {sql.marker} AND device_id = {sql.marker}",
            params,
        )
        return
    # On SQLite, one UPDATE ... FROM (VALUES ...) for the rows rather than an
    # executemany: sqlite3 releases the GIL around every statement step, and each
    # release hands it to paho's network thread, which is always waiting for it.
    # VALUES names its columns column1, column2, ...
    assignments = ", ".join(f"{name} = v.column{i}" for i, name in enumerate(columns, 1))
    row = f"({sql.markers(len(columns) + 2)})"
    for start in range(0, len(params), _STATEMENT_ROWS):
        chunk = padded(params[start : start + _STATEMENT_ROWS])
        sql.execute(
            f"UPDATE rollout_device SET {assignments} "
            f"FROM (VALUES {', '.join([row] * len(chunk))}) AS v "
            f"WHERE rollout_device.rollout_id = v.column{len(columns) + 1} "
            f"AND rollout_device.device_id = v.column{len(columns) + 2}",
            [value for values in chunk for value in values],
        )


# What `_read_progress` selects, in `_Progress`'s order.
_PROGRESS_COLUMNS = tuple(f.name for f in fields(_Progress) if f.name != "dirty")

# The progress row's column recording when a device first reached each step.
_STEP_TIMES = {
    "NOTIFIED": "notified_at",
    "DOWNLOADED": "downloaded_at",
    "VERIFIED": "verified_at",
    "INSTALLED": "installed_at",
    "ACTIVE": "active_at",
}
_TIME_COLUMNS = frozenset({"updated_at", *_STEP_TIMES.values()})
# Per rank: the step-time columns of the steps up to it.
_STEPS_UP_TO = {
    rank: tuple(_STEP_TIMES[step] for step in FUNNEL[1:] if RANK[step] <= rank)
    for rank in RANK.values()
}
# A device clock further off than this is not trusted for step times.
_CLOCK_TOLERANCE = timedelta(hours=1)
_ALWAYS_WRITTEN = ("state", "furthest_rank", "last_seq", "updated_at")
# States after which the device runs a version of the feature (the event's version),
# or none at all.
_RUNS_VERSION = ("ACTIVE", "ROLLED_BACK")


def _read_progress(sql: PlainSQL, keys: set[tuple[str, str]]) -> dict[tuple[str, str], _Progress]:
    """The progress rows of `keys`, locked for this transaction on PostgreSQL."""
    rollout_ids = padded(sorted({r for r, _ in keys}))
    device_ids = padded(sorted({d for _, d in keys}))
    # Replicas ingest one device's events concurrently (the shared subscription
    # splits them): lock its progress rows, always in one order, so neither
    # transaction overwrites the other's newer state with an older one. SQLite
    # has one writer at a time, and no FOR UPDATE.
    lock = " FOR UPDATE" if sql.postgresql else ""
    # Two plain IN lists (a batch names few rollouts), not a tuple IN: the primary
    # key still serves it. Pairs not asked for are skipped.
    rows = sql.select(
        _PROGRESS_COLUMNS,
        "FROM rollout_device "
        f"WHERE rollout_id IN ({sql.markers(len(rollout_ids))}) "
        f"AND device_id IN ({sql.markers(len(device_ids))}) "
        f"ORDER BY rollout_id, device_id{lock}",
        [*rollout_ids, *device_ids],
    )
    progress: dict[tuple[str, str], _Progress] = {}
    for values in rows:
        read = _Progress(*values)
        if (read.rollout_id, read.device_id) in keys:
            progress[(read.rollout_id, read.device_id)] = read
    return progress


def _apply_progress(
    session: Session,
    events: Sequence[IncomingEvent],
    now: datetime,
    *,
    sql: PlainSQL,
    times: TimeConversion,
    firmware: dict[str, str],
    deltas: adoption.AdoptionDeltas,
) -> None:
    keys = {(e.rollout_id, e.device_id) for e in events if e.rollout_id}
    if not keys:
        return
    bucket = time_bucket(now)
    for rollout_id, stored in Counter(e.rollout_id for e in events if e.rollout_id).items():
        deltas.add(rollout_id, "events", "stored", (-1, "", "", ""), bucket=bucket, value=stored)
    progress = _read_progress(sql, keys)
    changed: dict[tuple[str, str], _Progress] = {}
    running = adoption.RunningVersions(
        session, {(e.device_id, e.feature) for e in events if e.feature}
    )
    for event in sorted(events, key=lambda e: e.seq):
        row = progress.get((event.rollout_id, event.device_id))
        if row is not None and event.health is not None:
            # A health sample is a fact whenever it arrives, late or not.
            cohort = (row.stage, row.model, row.region, firmware.get(event.device_id, ""))
            _count_health(
                row.rollout_id,
                adoption.HEALTH,
                cohort,
                event.health,
                bucket=bucket,
                deltas=deltas,
                device_id=event.device_id,
            )
        if row is None or not applies(event.seq, row.last_seq):
            # Not exposed by this rollout, or a late event: it is kept, but the
            # device's state only moves forward in its own sequence order.
            continue
        after = advance(Standing(row.state, row.reason), event.state, event.error_code)
        _count(
            row,
            event,
            after,
            now=now,
            times=times,
            firmware=firmware.get(event.device_id, ""),
            deltas=deltas,
            running=running,
        )
        row.last_seq = event.seq
        if after.reason != row.reason:
            row.reason = after.reason
            row.dirty.add("reason")
        row.state = after.state
        row.furthest_rank = furthest_rank(row.furthest_rank, event.state)
        row.updated_at = now
        row.dirty.update(_ALWAYS_WRITTEN)
        changed[(row.rollout_id, row.device_id)] = row
    by_columns: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
    for row in changed.values():
        columns = tuple(name for name in _WRITTEN if name in row.dirty)
        by_columns.setdefault(columns, []).append(row.params(columns, times))
    for columns, params in by_columns.items():
        _write_progress(sql, columns, params)


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
    bucket = time_bucket(now)
    for event in samples:
        assert event.health is not None
        for target in attribution.targets(event.device_id, event.feature, event.version):
            _count_health(
                target.rollout_id,
                target.metric,
                target.cohort,
                event.health,
                bucket=bucket,
                deltas=deltas,
                device_id=event.device_id,
            )


def _count(
    row: _Progress,
    event: IncomingEvent,
    after: Standing,
    *,
    now: datetime,
    times: TimeConversion,
    firmware: str,
    deltas: adoption.AdoptionDeltas,
    running: adoption.RunningVersions,
) -> None:
    """What moving the row to `after` changes in the aggregates (called before it moves)."""
    cohort = (row.stage, row.model, row.region, firmware)
    rid = row.rollout_id
    bucket = time_bucket(now)
    _stamp_steps(row, event, cohort, now=now, times=times, deltas=deltas)
    new_state = after.state
    if new_state != row.state:
        if row.state != "TARGETED":
            deltas.add(rid, "state", row.state, cohort, value=-1)
        deltas.add(rid, "state", new_state, cohort)
        if new_state in ("FAILED", "ROLLED_BACK", "DEACTIVATED"):
            deltas.add(rid, "entered", new_state, cohort, bucket=bucket)
    failure_before = counted_failure(row.reason)
    if after.failure != failure_before:
        # Failures by reason count devices, even reverted since; a wait is not one.
        if failure_before:
            deltas.add(rid, "failed", failure_before, cohort, value=-1)
        if after.failure:
            deltas.add(rid, "failed", after.failure, cohort)
    if event.feature and new_state != row.state:
        _count_version(event, new_state, bucket, deltas, running)


def _stamp_steps(
    row: _Progress,
    event: IncomingEvent,
    cohort: tuple[int, str, str, str],
    *,
    now: datetime,
    times: TimeConversion,
    deltas: adoption.AdoptionDeltas,
) -> None:
    """Record when the device first reached each step this event implies, and count it."""
    reached = RANK.get(event.state, 0)
    if all(getattr(row, column) is not None for column in _STEPS_UP_TO[reached]):
        return  # the common case (a device reporting again): no datetime to read
    rid = row.rollout_id
    when = event.device_time
    if when is None or abs(utc(when) - now) > _CLOCK_TOLERANCE:
        when = now
    when = utc(when)
    bucket = time_bucket(now)
    exposed_at = _time(times, row.exposed_at)
    previous = exposed_at
    for step in FUNNEL[1:]:
        stamp = getattr(row, _STEP_TIMES[step])
        if stamp is not None:
            previous = _time(times, stamp)
        elif RANK[step] <= reached:
            at = max(when, previous)
            setattr(row, _STEP_TIMES[step], at)
            row.dirty.add(_STEP_TIMES[step])
            deltas.add(rid, "reached", step, cohort, bucket=bucket)
            step_seconds = (at - previous).total_seconds()
            deltas.add(rid, "step_time", step, cohort, bucket=duration_bucket(step_seconds))
            if step in ("INSTALLED", "ACTIVE"):
                total = (at - exposed_at).total_seconds()
                deltas.add(rid, "latency", step, cohort, bucket=duration_bucket(total))
            previous = at


def _time(times: TimeConversion, stored: Any) -> datetime:
    """A datetime column's value, as read or as set by this batch, as an aware UTC datetime."""
    value = stored if isinstance(stored, datetime) else times.from_db(stored)
    assert value is not None
    return utc(value)


def _count_health(
    rid: str,
    metric: str,
    cohort: tuple[int, str, str, str],
    health: HealthFigures,
    *,
    bucket: int,
    deltas: adoption.AdoptionDeltas,
    device_id: str = "",
) -> None:
    """Add one sample to a rollout's health sums, in the minute (`bucket`) it arrived."""
    deltas.add_health(
        rid,
        metric,
        cohort,
        bucket=bucket,
        crashes=health.crashes,
        feature_errors=health.feature_errors,
        uses=health.uses,
        device_id=device_id,
    )


def _count_version(
    event: IncomingEvent,
    state: str,
    bucket: int,
    deltas: adoption.AdoptionDeltas,
    running: adoption.RunningVersions,
) -> None:
    if state in _RUNS_VERSION:
        now_running = event.version
    elif state == "DEACTIVATED":
        now_running = ""
    else:
        return
    key = (event.device_id, event.feature)
    before = running.get(key)
    if before == now_running:
        return
    if before:
        deltas.versions[(event.feature, before, bucket)] -= 1
    if now_running:
        deltas.versions[(event.feature, now_running, bucket)] += 1
    running.set(key, now_running)
    deltas.running[key] = now_running


def count_drops(session: Session, dropped: Counter[str]) -> None:
    for reason, n in dropped.items():
        row = session.get(IngestDropRow, reason) or IngestDropRow(reason=reason, count=0)
        row.count += n
        session.add(row)


def drop_counts(session: Session) -> dict[str, int]:
    return {row.reason: row.count for row in session.exec(select(IngestDropRow))}
