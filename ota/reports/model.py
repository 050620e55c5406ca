"""The adoption report of one rollout, read from per-device progress rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from ota.clock import utc
from ota.domain.bucketing import PPM_MAX
from ota.domain.plan import RolloutPlan
from ota.domain.states import FUNNEL, RANK
from ota.rollout.exposure import eligible_devices
from ota.store import bundles, rollouts
from ota.store.models import DeviceEventRow, RolloutAuditRow, RolloutDeviceRow, RolloutRow


@dataclass(frozen=True)
class Cohort:
    dimension: str
    value: str
    exposed: int
    active: int
    failed: int


@dataclass(frozen=True)
class AdoptionReport:
    rollout: RolloutRow
    generated_at: datetime
    data_time: datetime | None
    eligible: int
    target_exposed: int
    exposed: int
    funnel: list[tuple[str, int]]
    current_states: dict[str, int]
    failures_by_reason: dict[str, int]  # devices that failed, even if since reverted
    cohorts: list[Cohort]
    timeline: list[RolloutAuditRow]
    events_ingested: int
    stages: list[tuple[int, int]] = field(default_factory=list)  # (ppm, exposed at that stage)

    def conversion_ppm(self, index: int) -> int:
        if index == 0:
            return PPM_MAX
        previous = self.funnel[index - 1][1]
        return self.funnel[index][1] * PPM_MAX // previous if previous else 0


def build_report(session: Session, rollout_id: str, now: datetime) -> AdoptionReport:
    rollout = rollouts.get_rollout(session, rollout_id)
    plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
    bundle = bundles.get_bundle(session, rollout.bundle_name)
    eligible = len(eligible_devices(session, rollout, bundle))
    current_ppm = plan.stages[rollout.current_stage].ppm if rollout.current_stage >= 0 else 0
    where = RolloutDeviceRow.rollout_id == rollout_id

    ranks = dict(
        session.exec(
            select(RolloutDeviceRow.furthest_rank, func.count())
            .where(where)
            .group_by(col(RolloutDeviceRow.furthest_rank))
        ).all()
    )
    funnel = [(step, sum(n for rank, n in ranks.items() if rank >= RANK[step])) for step in FUNNEL]
    states = rollouts.state_counts(session, rollout_id)
    reasons = dict(
        session.exec(
            select(RolloutDeviceRow.reason, func.count())
            .where(where, RolloutDeviceRow.reason != "")
            .group_by(col(RolloutDeviceRow.reason))
        ).all()
    )
    cohorts = _cohorts(session, rollout_id, "model") + _cohorts(session, rollout_id, "region")
    events, newest = session.exec(
        select(func.count(), func.max(DeviceEventRow.received_at)).where(
            DeviceEventRow.rollout_id == rollout_id
        )
    ).one()
    per_stage = rollouts.stage_exposure(session, rollout_id)
    return AdoptionReport(
        rollout=rollout,
        generated_at=now,
        data_time=utc(newest) if newest else None,
        eligible=eligible,
        target_exposed=_target(eligible, current_ppm),
        exposed=sum(states.values()),
        funnel=funnel,
        current_states=dict(sorted(states.items())),
        failures_by_reason=dict(sorted(reasons.items())),
        cohorts=cohorts,
        timeline=rollouts.audit_log(session, rollout_id),
        events_ingested=int(events),
        stages=[(s.ppm, per_stage.get(i, 0)) for i, s in enumerate(plan.stages)],
    )


def _target(eligible: int, ppm: int) -> int:
    """The exposure the stage aims for: its share of the eligible fleet."""
    return eligible * ppm // PPM_MAX


def _cohorts(session: Session, rollout_id: str, dimension: str) -> list[Cohort]:
    column = col(getattr(RolloutDeviceRow, dimension))
    ever_failed = col(RolloutDeviceRow.reason) != ""
    rows = session.exec(
        select(column, RolloutDeviceRow.state, ever_failed, func.count())
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .group_by(column, col(RolloutDeviceRow.state), ever_failed)
    ).all()
    totals: dict[str, dict[str, int]] = {}
    failed: dict[str, int] = {}
    for value, state, has_failed, n in rows:
        by_state = totals.setdefault(value, {})
        by_state[state] = by_state.get(state, 0) + int(n)
        if has_failed:
            failed[value] = failed.get(value, 0) + int(n)
    return [
        Cohort(
            dimension,
            value,
            exposed=sum(by_state.values()),
            active=by_state.get("ACTIVE", 0),
            failed=failed.get(value, 0),
        )
        for value, by_state in sorted(totals.items())
    ]
