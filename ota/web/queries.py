"""What the dashboard's list pages read: grouped queries, no scan of the events."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Table, func
from sqlmodel import Session, col, select

from ota.domain.bucketing import PPM_MAX
from ota.domain.plan import RolloutPlan
from ota.domain.states import ROLLOUT_FINAL
from ota.errors import InvalidArgument, NotFound
from ota.reports.figures import pct
from ota.reports.labels import label, rollout_state_label
from ota.rollout.exposure import holdout_count
from ota.store import adoption
from ota.store.models import (
    AdoptionStatRow,
    BundleRow,
    DeviceEventRow,
    DeviceRow,
    DeviceVersionRow,
    RolloutDeviceRow,
    RolloutRow,
)

ROLLOUT_STATES = ("DRAFT", "RUNNING", "PAUSED", "COMPLETED", "ABORTED", "ROLLED_BACK", "KILLED")


@dataclass(frozen=True)
class RolloutLine:
    rollout_id: str
    feature: str
    version: str
    state: str
    state_label: str
    stage: str
    phase: str
    eligible: int  # outside the holdout: the devices the rollout may expose
    holdout: int
    exposed: int
    active: int
    used: int
    adoption: str  # active / exposed
    use: str  # used / active
    unhealthy: str  # exposed devices' unhealthy sample share
    holdout_unhealthy: str  # the holdout's, or "-"
    gate: str
    updated: datetime


def _share(part: int, whole: int) -> str:
    return pct(part * PPM_MAX // whole) if whole else "-"


def rollout_lines(session: Session, *, feature: str = "", state: str = "") -> list[RolloutLine]:
    """The rollouts, newest first, with their headline figures (one aggregate query)."""
    if state and state not in ROLLOUT_STATES:
        raise InvalidArgument(f"{state!r} is not a rollout state", field="state")
    query = select(RolloutRow).order_by(col(RolloutRow.created_at).desc())
    if feature:
        query = query.where(RolloutRow.feature == feature)
    if state:
        query = query.where(RolloutRow.state == state)
    rows = list(session.exec(query.limit(500)))
    if not rows:
        return []
    table: Table = AdoptionStatRow.__table__  # type: ignore[attr-defined]
    wanted = (adoption.EXPOSED, "state", adoption.HEALTH, adoption.HOLDOUT_HEALTH, adoption.USED)
    sums: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
    for rid, metric, key, total in session.execute(
        table.select()
        .with_only_columns(table.c.rollout_id, table.c.metric, table.c.key, func.sum(table.c.value))
        .where(
            table.c.rollout_id.in_([r.rollout_id for r in rows]),
            table.c.metric.in_(wanted),
        )
        .group_by(table.c.rollout_id, table.c.metric, table.c.key)
    ):
        sums[rid][(metric, key)] += int(total or 0)
    out: list[RolloutLine] = []
    for r in rows:
        s = sums[r.rollout_id]
        plan = RolloutPlan.from_json(r.stages_json, r.gate_json)
        exposed = s[(adoption.EXPOSED, "")]
        active = s[("state", "ACTIVE")]
        used = s[(adoption.USED, "")]
        samples = s[(adoption.HEALTH, "samples")]
        control = s[(adoption.HOLDOUT_HEALTH, "samples")]
        stage = f"{r.current_stage + 1} of {len(plan.stages)}" if r.current_stage >= 0 else "-"
        eligible = r.eligible or 0
        holdout = 0
        if plan.holdout_ppm and eligible:
            bundle = session.get(BundleRow, r.bundle_name)
            holdout = holdout_count(session, r, bundle, eligible) if bundle else 0
        out.append(
            RolloutLine(
                r.rollout_id,
                r.feature,
                r.version,
                r.state,
                rollout_state_label(r.state),
                stage,
                label(r.phase) if r.phase and r.state == "RUNNING" else "",
                eligible - holdout,
                holdout,
                exposed,
                active,
                used,
                _share(active, exposed),
                _share(used, active),
                _share(s[(adoption.HEALTH, "unhealthy_samples")], samples),
                _share(s[(adoption.HOLDOUT_HEALTH, "unhealthy_samples")], control)
                if plan.holdout_ppm
                else "no holdout",
                _gate_status(r, plan),
                r.updated_at,
            )
        )
    return out


def _gate_status(rollout: RolloutRow, plan: RolloutPlan) -> str:
    if not plan.gates:
        return "no gates"
    if "gate tripped" in rollout.state_reason and (
        rollout.state in ROLLOUT_FINAL or rollout.state == "PAUSED"
    ):
        return rollout.state_reason.split(":", 1)[0]
    worst = ""
    for index, gate in enumerate(plan.gates):
        streak = (rollout.gate_state or {}).get(f"{index}:{gate.key}", {})
        n = int(streak.get("n", 0))
        if n:
            worst = f"{label(gate.metric)}: breach {n} of {gate.breaches_to_trip}"
    return worst or f"{len(plan.gates)} ok"


def features(session: Session) -> list[str]:
    return sorted(set(session.exec(select(RolloutRow.feature))))


@dataclass(frozen=True)
class FleetCounts:
    devices: int
    online: int
    revoked: int
    by: dict[str, list[tuple[str, int]]]  # dimension -> (value, devices), most first
    versions: list[tuple[str, str, int]]  # (feature, version, devices)


def fleet_counts(session: Session) -> FleetCounts:
    """Devices by model, region, firmware and label, and the feature versions they run."""
    device: Table = DeviceRow.__table__  # type: ignore[attr-defined]
    by: dict[str, Counter[str]] = defaultdict(Counter)
    devices = online = revoked = 0
    for model, region, firmware, labels_json, is_online, is_revoked, n in session.execute(
        device.select()
        .with_only_columns(
            device.c.model,
            device.c.region,
            device.c.firmware,
            device.c.labels_json,
            device.c.online,
            device.c.revoked,
            func.count(),
        )
        .group_by(
            device.c.model,
            device.c.region,
            device.c.firmware,
            device.c.labels_json,
            device.c.online,
            device.c.revoked,
        )
    ):
        if is_revoked:
            revoked += n
            continue
        devices += n
        online += n if is_online else 0
        by["model"][model] += n
        by["region"][region] += n
        by["firmware"][firmware] += n
        for k, v in json.loads(labels_json or "{}").items():
            by["label"][f"{k}={v}"] += n
    versions: Table = DeviceVersionRow.__table__  # type: ignore[attr-defined]
    running = [
        (f, v, int(n))
        for f, v, n in session.execute(
            versions.select()
            .with_only_columns(versions.c.feature, versions.c.version, func.count())
            .group_by(versions.c.feature, versions.c.version)
            .order_by(versions.c.feature, versions.c.version)
        )
    ]
    return FleetCounts(
        devices,
        online,
        revoked,
        {d: by[d].most_common() for d in ("model", "region", "firmware", "label")},
        running,
    )


@dataclass(frozen=True)
class DeviceTimeline:
    device: DeviceRow
    labels: dict[str, str]
    versions: list[tuple[str, str]]
    rollouts: list[RolloutDeviceRow]
    events: list[DeviceEventRow]


def device_timeline(session: Session, device_id: str, *, events: int = 200) -> DeviceTimeline:
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise NotFound(f"device {device_id} does not exist", field="device_id")
    running = [
        (v.feature, v.version)
        for v in session.exec(
            select(DeviceVersionRow).where(DeviceVersionRow.device_id == device_id)
        )
    ]
    exposures = list(
        session.exec(
            select(RolloutDeviceRow)
            .where(RolloutDeviceRow.device_id == device_id)
            .order_by(col(RolloutDeviceRow.exposed_at).desc())
        )
    )
    recent = list(
        session.exec(
            select(DeviceEventRow)
            .where(DeviceEventRow.device_id == device_id)
            .order_by(col(DeviceEventRow.seq).desc())
            .limit(events)
        )
    )
    return DeviceTimeline(row, json.loads(row.labels_json or "{}"), running, exposures, recent)
