"""Rollouts, their exposed devices and their audit log.

Every state change is a conditional update on `revision`, so two writers (an
operator and the engine, or two replicas) can never both win, and a control
plane killed between steps resumes from what was committed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Table, func, update
from sqlmodel import Session, col, select

from ota.clock import utc
from ota.domain import webhooks as webhook_domain
from ota.domain.durations import time_bucket
from ota.domain.states import DELETED
from ota.errors import Aborted, NotFound
from ota.store import adoption, audit, webhooks
from ota.store.changes import rollout_changed
from ota.store.models import (
    AdoptionStatRow,
    DeviceEventRow,
    DeviceRow,
    RolloutAuditRow,
    RolloutDeviceRow,
    RolloutRow,
)


def get_rollout(session: Session, rollout_id: str) -> RolloutRow:
    """A rollout that exists; a deleted one is NOT_FOUND, pointing at its history."""
    row = get_rollout_or_deleted(session, rollout_id)
    if row.state == DELETED:
        raise NotFound(
            f"rollout {rollout_id!r} was deleted; `ota rollout history {rollout_id}` shows "
            "who deleted it and why",
            field="rollout_id",
        )
    return row


def get_rollout_or_deleted(session: Session, rollout_id: str) -> RolloutRow:
    """For the audit log, which outlives a deletion."""
    row = session.get(RolloutRow, rollout_id)
    if row is None:
        raise NotFound(f"rollout {rollout_id!r} does not exist", field="rollout_id")
    return row


def rollout_by_request(session: Session, request_id: str) -> RolloutRow | None:
    """The rollout a request_id created, deleted or not (a deleted one keeps its id taken)."""
    return session.exec(select(RolloutRow).where(RolloutRow.request_id == request_id)).first()


def list_rollouts(
    session: Session, feature: str, *, after: str, limit: int, show_deleted: bool = False
) -> list[RolloutRow]:
    query = select(RolloutRow).where(col(RolloutRow.rollout_id) > after)
    if feature:
        query = query.where(RolloutRow.feature == feature)
    if not show_deleted:
        query = query.where(col(RolloutRow.state) != DELETED)
    return list(session.exec(query.order_by(col(RolloutRow.rollout_id)).limit(limit)))


def rollout_devices(
    session: Session, rollout_id: str, state: str, *, after: str, limit: int
) -> tuple[list[RolloutDeviceRow], int]:
    """A page of the rollout's devices (by device id), and how many match in all."""
    where = [RolloutDeviceRow.rollout_id == rollout_id]
    if state:
        where.append(RolloutDeviceRow.state == state)
    rows = session.exec(
        select(RolloutDeviceRow)
        .where(*where, col(RolloutDeviceRow.device_id) > after)
        .order_by(col(RolloutDeviceRow.device_id))
        .limit(limit)
    ).all()
    total = session.exec(select(func.count()).select_from(RolloutDeviceRow).where(*where)).one()
    return list(rows), int(total)


def last_details(session: Session, rollout_id: str, device_ids: Sequence[str]) -> dict[str, str]:
    """The detail of each device's last event in the rollout, where it gave one."""
    if not device_ids:
        return {}
    rows = session.exec(
        select(DeviceEventRow.device_id, DeviceEventRow.detail)
        .where(
            DeviceEventRow.rollout_id == rollout_id,
            col(DeviceEventRow.device_id).in_(device_ids),
            DeviceEventRow.detail != "",
        )
        .order_by(col(DeviceEventRow.device_id), col(DeviceEventRow.seq))
    ).all()
    return {device_id: detail for device_id, detail in rows}


def rollouts_in(session: Session, states: Sequence[str]) -> list[RolloutRow]:
    query = select(RolloutRow).where(col(RolloutRow.state).in_(states))
    return list(session.exec(query.order_by(col(RolloutRow.rollout_id))))


def transition(
    session: Session,
    rollout: RolloutRow,
    *,
    to_state: str,
    actor: str,
    action: str,
    reason: str,
    now: datetime,
    diff: dict[str, Any] | None = None,
    **changes: Any,
) -> RolloutRow:
    """Move a rollout to `to_state` if nobody changed it since it was read; audit it.

    The audit entry's diff holds every field that changed (`[before, after]`),
    plus whatever the caller adds (a plan, gate figures).
    """
    values = {"state": to_state, "updated_at": now, "revision": rollout.revision + 1, **changes}
    # Read before the update: the ORM refreshes `rollout` from the UPDATE it runs.
    from_state, from_stage = rollout.state, rollout.current_stage
    changed = {
        name: [_plain(getattr(rollout, name)), _plain(value)]
        for name, value in values.items()
        if name not in ("updated_at", "revision", "state_reason")
        and _plain(getattr(rollout, name)) != _plain(value)
    }
    if reason:
        values["state_reason"] = reason
    result = session.execute(
        update(RolloutRow)
        .where(col(RolloutRow.rollout_id) == rollout.rollout_id)
        .where(col(RolloutRow.revision) == rollout.revision)
        .values(**values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Aborted(
            f"rollout {rollout.rollout_id} changed concurrently; read it again and retry",
            field="etag",
        )
    rollout_changed(session, rollout.rollout_id)
    _audit(
        session,
        rollout,
        RolloutAuditRow(
            rollout_id=rollout.rollout_id,
            time=now,
            actor=actor,
            action=action,
            from_state=from_state,
            to_state=to_state,
            stage=changes.get("current_stage", from_stage),
            reason=reason,
            diff={**changed, **(diff or {})} or None,
        ),
    )
    session.expire(rollout)
    return get_rollout_or_deleted(session, rollout.rollout_id)


def _audit(session: Session, rollout: RolloutRow, entry: RolloutAuditRow) -> None:
    """The one place a rollout's audit entries are written; the events they are go with them.

    The webhook outbox rows commit in the same transaction as the entry, so a
    crash can neither lose an announced change nor announce one that never was.
    """
    entry.address = audit.requester().address
    session.add(entry)
    for event_type in webhook_domain.rollout_events(entry.action, entry.diff):
        webhooks.enqueue(
            session,
            event_type,
            data=_event_data(rollout, entry),
            ordering_key=webhook_domain.ordering_key(rollout_id=rollout.rollout_id),
            now=entry.time,
            feature=rollout.feature,
            rollout_id=rollout.rollout_id,
        )


def _event_data(rollout: RolloutRow, entry: RolloutAuditRow) -> dict[str, Any]:
    stages = len(json.loads(rollout.stages_json or "[]"))
    data: dict[str, Any] = {
        "rollout_id": rollout.rollout_id,
        "feature": rollout.feature,
        "version": rollout.version,
        "action": entry.action,
        "actor": entry.actor,
        "reason": entry.reason,
        "from_state": entry.from_state,
        "state": entry.to_state,
        # Numbered as the CLI shows it: stage 1 of N; 0 before the first.
        "stage": entry.stage + 1 if entry.stage >= 0 else 0,
        "stages": stages,
    }
    figures = (entry.diff or {}).get("figures")
    if figures is not None:
        data["gate"] = figures
    return data


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def set_quietly(session: Session, rollout: RolloutRow, **values: Any) -> None:
    """Bookkeeping under the lock the caller holds (gate streaks): no revision, no audit."""
    session.execute(
        update(RolloutRow)
        .where(col(RolloutRow.rollout_id) == rollout.rollout_id)
        .where(col(RolloutRow.revision) == rollout.revision)
        .values(**values)
    )
    rollout_changed(session, rollout.rollout_id)
    for name, value in values.items():
        setattr(rollout, name, value)


def lock_if(session: Session, rollout: RolloutRow, state: str) -> bool:
    """Take the rollout's row lock if it is still as read (same revision, `state`).

    A no-op conditional update: on SQLite it takes the write lock before any
    other write, on PostgreSQL the row lock; either way a command that changes
    the rollout cannot commit in the middle of what the caller does next.
    """
    result = session.execute(
        update(RolloutRow)
        .where(col(RolloutRow.rollout_id) == rollout.rollout_id)
        .where(col(RolloutRow.revision) == rollout.revision)
        .where(col(RolloutRow.state) == state)
        .values(revision=rollout.revision)
    )
    return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def exposed_device_ids(session: Session, rollout_id: str) -> set[str]:
    query = select(RolloutDeviceRow.device_id).where(RolloutDeviceRow.rollout_id == rollout_id)
    return set(session.exec(query))


class ExposedDevice(Protocol):
    """What exposure records of a device (a `DeviceRow` or a `fleet.DeviceInfo`)."""

    @property
    def device_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def firmware(self) -> str: ...


_PROGRESS: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]


def expose(
    session: Session,
    rollout_id: str,
    devices: Iterable[ExposedDevice],
    stage: int,
    now: datetime,
) -> int:
    """Add progress rows for newly exposed devices, and count them in the aggregates.

    The `exposed` metric of `adoption_stat` (per stage, model, region, firmware at
    exposure) is what reports read for exposure, state and cohort figures.
    One Core executemany: a stage of the whole fleet is one statement, not an
    ORM object per device.
    """
    deltas = adoption.AdoptionDeltas()
    bucket = time_bucket(now)
    rows: list[dict[str, Any]] = []
    for device in devices:
        deltas.add(
            rollout_id,
            adoption.EXPOSED,
            "",
            (stage, device.model, device.region, device.firmware),
            bucket=bucket,
        )
        rows.append(
            {
                "rollout_id": rollout_id,
                "device_id": device.device_id,
                "model": device.model,
                "region": device.region,
                "stage": stage,
                "state": "TARGETED",
                "reason": "",
                "furthest_rank": 0,
                "last_seq": 0,
                "exposed_at": now,
                "updated_at": now,
            }
        )
    if rows:
        session.execute(_PROGRESS.insert(), rows)
        rollout_changed(session, rollout_id)
    adoption.write(session, deltas)
    return len(rows)


def state_counts(
    session: Session,
    rollout_id: str,
    *,
    stage: int | None = None,
    changed_since: datetime | None = None,
) -> dict[str, int]:
    """Devices per state, optionally of one stage or changed since a moment."""
    query = (
        select(RolloutDeviceRow.state, func.count())
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .group_by(col(RolloutDeviceRow.state))
    )
    if stage is not None:
        query = query.where(RolloutDeviceRow.stage == stage)
    if changed_since is not None:
        query = query.where(col(RolloutDeviceRow.updated_at) >= changed_since)
    return {state: int(n) for state, n in session.exec(query)}


def state_and_stage_counts(
    session: Session, rollout_id: str
) -> tuple[dict[str, int], dict[int, int]]:
    """Devices per state and devices per stage, from one GROUP BY (what the API shows)."""
    query = (
        select(RolloutDeviceRow.stage, RolloutDeviceRow.state, func.count())
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .group_by(col(RolloutDeviceRow.stage), col(RolloutDeviceRow.state))
    )
    by_state: dict[str, int] = {}
    by_stage: dict[int, int] = {}
    for stage, state, n in session.exec(query):
        by_state[state] = by_state.get(state, 0) + int(n)
        by_stage[stage] = by_stage.get(stage, 0) + int(n)
    return by_state, by_stage


def offline_counts(session: Session, rollout_id: str) -> tuple[int, int]:
    """(offline, exposed) over the devices the rollout exposed, as the broker last saw them."""
    query = (
        select(DeviceRow.online, func.count())
        .join(RolloutDeviceRow, col(RolloutDeviceRow.device_id) == col(DeviceRow.device_id))
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .group_by(col(DeviceRow.online))
    )
    counts = {bool(online): int(n) for online, n in session.exec(query)}
    return counts.get(False, 0), sum(counts.values())


def stage_exposure(session: Session, rollout_id: str) -> dict[int, int]:
    query = (
        select(RolloutDeviceRow.stage, func.count())
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .group_by(col(RolloutDeviceRow.stage))
    )
    return {stage: int(n) for stage, n in session.exec(query)}


# The audit action of the engine entering a stage (`RolloutEngine._enter_stage`):
# the one record of when each stage, not only the current one, started.
ENTERED_STAGE = "advance"


def stage_start_times(session: Session, rollout_id: str) -> dict[int, datetime]:
    """When the rollout entered each stage it has reached, by stage index."""
    query = (
        select(RolloutAuditRow.stage, func.max(RolloutAuditRow.time))
        .where(RolloutAuditRow.rollout_id == rollout_id)
        .where(RolloutAuditRow.action == ENTERED_STAGE)
        .group_by(col(RolloutAuditRow.stage))
    )
    return {int(stage): utc(when) for stage, when in session.exec(query)}


def stage_starts(timeline: Iterable[RolloutAuditRow]) -> dict[int, datetime]:
    """`stage_start_times` from an audit log already read (oldest first)."""
    return {e.stage: utc(e.time) for e in timeline if e.action == ENTERED_STAGE}


def audit_log(session: Session, rollout_id: str, *, after_id: int = 0) -> list[RolloutAuditRow]:
    query = (
        select(RolloutAuditRow)
        .where(RolloutAuditRow.rollout_id == rollout_id)
        .where(col(RolloutAuditRow.id) > after_id)
        .order_by(col(RolloutAuditRow.id))
    )
    return list(session.exec(query))


def record(
    session: Session,
    rollout: RolloutRow,
    *,
    actor: str,
    action: str,
    reason: str,
    now: datetime,
    diff: dict[str, Any] | None = None,
) -> None:
    """Audit a decision that does not change the rollout's state (e.g. a stage's exposure)."""
    _audit(
        session,
        rollout,
        RolloutAuditRow(
            rollout_id=rollout.rollout_id,
            time=now,
            actor=actor,
            action=action,
            from_state=rollout.state,
            to_state=rollout.state,
            stage=rollout.current_stage,
            reason=reason,
            diff=diff,
        ),
    )


def fleet_devices(session: Session) -> list[DeviceRow]:
    """Every registered device, revoked or not, in id order (what a dry run classifies)."""
    return list(session.exec(select(DeviceRow).order_by(col(DeviceRow.device_id))))


def health_totals(session: Session, rollout_id: str) -> dict[str, int]:
    """Health samples of the rollout's exposed devices, summed by field (samples, crashes, ...).

    Read from the adoption aggregates that ingest maintains (`adoption_stat`,
    metric `health`); they are totals over the rollout, not time-bucketed.
    """
    query = (
        select(AdoptionStatRow.key, func.sum(AdoptionStatRow.value))
        .where(AdoptionStatRow.rollout_id == rollout_id)
        .where(AdoptionStatRow.metric == "health")
        .group_by(col(AdoptionStatRow.key))
    )
    return {key: int(total or 0) for key, total in session.exec(query)}
