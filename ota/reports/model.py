"""The adoption report of one rollout, and of one feature across its rollouts.

Everything here is read from the aggregates ingest maintains (`adoption_stat`,
`feature_version_stat`) and the per-device progress rows -- never from the
events themselves -- so a report costs the same at a thousand events as at a
million.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Table
from sqlmodel import Session, col, select

from ota.clock import utc
from ota.domain.bucketing import PPM_MAX
from ota.domain.durations import (
    TIME_BUCKET_SECONDS,
    bucket_time,
    percentile_seconds,
)
from ota.domain.plan import RolloutPlan
from ota.domain.progress import is_waiting
from ota.domain.states import ALL_STATES, FUNNEL, SETTLED
from ota.rollout.exposure import reported_eligible
from ota.store import adoption, bundles, rollouts
from ota.store.models import (
    AdoptionStatRow,
    DeviceRow,
    FeatureVersionStatRow,
    RolloutAuditRow,
    RolloutDeviceRow,
    RolloutRow,
)

DIMENSIONS = ("model", "region", "firmware")
LAST_SEEN_BUCKETS = ("<1m", "1-10m", "10-60m", "1-24h", ">1d", "never")
NO_HOLDOUT = "no holdout configured: exposed devices are not compared with a control group"


@dataclass(frozen=True)
class FunnelStep:
    step: str
    devices: int
    conversion_ppm: int
    median_step_seconds: float


@dataclass(frozen=True)
class StageFunnel:
    stage: int
    ppm: int
    steps: list[FunnelStep]


@dataclass(frozen=True)
class Cohort:
    dimension: str
    value: str
    exposed: int
    active: int
    failed: int
    installed: int = 0


@dataclass(frozen=True)
class FailureByCohort:
    reason: str
    dimension: str
    value: str
    devices: int


@dataclass(frozen=True)
class ExposureGap:
    target: int
    exposed: int
    applied: int
    reasons: dict[str, int]


@dataclass(frozen=True)
class AdoptionPoint:
    time: datetime
    active: int
    installed: int
    failed: int
    reverted: int


@dataclass(frozen=True)
class Latency:
    name: str
    devices: int
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float


@dataclass(frozen=True)
class HealthGroup:
    name: str
    devices: int
    samples: int
    crashes: int
    feature_errors: int
    unhealthy_ppm: int


@dataclass(frozen=True)
class HealthComparison:
    exposed: HealthGroup
    control: HealthGroup | None
    note: str


@dataclass(frozen=True)
class Stragglers:
    unreachable: int
    reachable_not_applied: int
    last_seen: dict[str, int]
    # Of them, those that gave up waiting for the control plane (not failures).
    waiting_for_control_plane: int = 0


@dataclass(frozen=True)
class AdoptionReport:
    rollout: RolloutRow
    generated_at: datetime
    data_time: datetime | None
    eligible: int
    target_exposed: int
    exposed: int
    funnel: list[FunnelStep]
    current_states: dict[str, int]
    failures_by_reason: dict[str, int]  # devices that failed, even if since reverted
    cohorts: list[Cohort]
    timeline: list[RolloutAuditRow]
    events_ingested: int
    stages: list[tuple[int, int]] = field(default_factory=list)  # (ppm, exposed at that stage)
    signer_keyids: list[str] = field(default_factory=list)
    plan_version: str = ""
    exposure_gap: ExposureGap | None = None
    stage_funnels: list[StageFunnel] = field(default_factory=list)
    failures_by_cohort: list[FailureByCohort] = field(default_factory=list)
    adoption_curve: list[AdoptionPoint] = field(default_factory=list)
    latencies: list[Latency] = field(default_factory=list)
    health: HealthComparison | None = None
    stragglers: Stragglers | None = None


@dataclass(frozen=True)
class VersionSeries:
    version: str
    points: list[tuple[datetime, int]]
    devices_now: int


@dataclass(frozen=True)
class FeatureReport:
    feature: str
    generated_at: datetime
    versions: list[VersionSeries]
    rollouts: list[RolloutRow]


@dataclass(frozen=True)
class _Stat:
    metric: str
    key: str
    stage: int
    model: str
    region: str
    firmware: str
    bucket: int
    value: int

    def dim(self, dimension: str) -> str:
        return str(getattr(self, dimension))


def _conversion(devices: int, previous: int | None) -> int:
    if previous is None:
        return PPM_MAX
    return devices * PPM_MAX // previous if previous else 0


def _funnel(exposed: int, stats: Iterable[_Stat]) -> list[FunnelStep]:
    reached: dict[str, int] = defaultdict(int)
    step_times: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for s in stats:
        if s.metric == "reached":
            reached[s.key] += s.value
        elif s.metric == "step_time":
            step_times[s.key][s.bucket] += s.value
    steps: list[FunnelStep] = []
    previous: int | None = None
    for step in FUNNEL:
        n = exposed if step == "TARGETED" else reached[step]
        median = percentile_seconds(step_times[step], 0.5) if step != "TARGETED" else 0.0
        steps.append(FunnelStep(step, n, _conversion(n, previous), median))
        previous = n
    return steps


def build_report(session: Session, rollout_id: str, now: datetime) -> AdoptionReport:
    """The adoption report of one rollout, as of `now`."""
    rollout = rollouts.get_rollout(session, rollout_id)
    plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
    bundle = bundles.get_bundle(session, rollout.bundle_name)
    eligible = reported_eligible(session, rollout, bundle)
    current_ppm = plan.stages[rollout.current_stage].ppm if rollout.current_stage >= 0 else 0
    stats = _stats(session, rollout_id)
    per_stage: dict[int, int] = defaultdict(int)
    cohort_exposure: dict[tuple[str, str], int] = defaultdict(int)
    reported: dict[str, int] = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    failures_by_cohort: dict[tuple[str, str, str], int] = defaultdict(int)
    newest_event_bucket: int | None = None
    for s in stats:
        if s.metric == adoption.EXPOSED:
            per_stage[s.stage] += s.value
            for d in DIMENSIONS:
                cohort_exposure[(d, s.dim(d))] += s.value
        elif s.metric == "state":
            reported[s.key] += s.value
        elif s.metric == "failed":
            reasons[s.key] += s.value
            for d in DIMENSIONS:
                failures_by_cohort[(s.key, d, s.dim(d))] += s.value
        elif s.metric == "events" and s.value:
            newest_event_bucket = max(s.bucket, newest_event_bucket or s.bucket)
    exposed = sum(per_stage.values())
    # `state` counts devices that reported, by state; the rest of the exposed are TARGETED.
    states = {k: v for k, v in reported.items() if v and k != "TARGETED"}
    if exposed - sum(states.values()):
        states["TARGETED"] = exposed - sum(states.values())
    target = eligible * current_ppm // PPM_MAX
    stragglers = _stragglers(session, rollout_id, now)
    # Data freshness: the start of the newest minute in which an event of the rollout was
    # stored (the aggregates are per minute).
    data_time = bucket_time(newest_event_bucket) if newest_event_bucket is not None else None
    not_notified = states.get("TARGETED", 0)
    failed_now = states.get("FAILED", 0)
    applied = sum(states.get(s, 0) for s in SETTLED)
    in_progress = exposed - not_notified - failed_now - applied
    gap = ExposureGap(
        target=target,
        exposed=exposed,
        applied=applied,
        reasons={
            "not_yet_notified": not_notified,
            "offline": stragglers.unreachable,
            "in_progress": max(in_progress, 0),
            "failed": failed_now,
            "rounding": target - exposed,
        },
    )
    return AdoptionReport(
        rollout=rollout,
        generated_at=now,
        data_time=data_time,
        eligible=eligible,
        target_exposed=target,
        exposed=exposed,
        funnel=_funnel(exposed, stats),
        current_states=dict(sorted(states.items())),
        failures_by_reason=dict(sorted((k, v) for k, v in reasons.items() if v)),
        cohorts=_cohorts(stats, cohort_exposure),
        timeline=rollouts.audit_log(session, rollout_id),
        events_ingested=sum(s.value for s in stats if s.metric == "events"),
        stages=[(s.ppm, per_stage.get(i, 0)) for i, s in enumerate(plan.stages)],
        signer_keyids=list(json.loads(bundle.signer_keyids_json)),
        plan_version=str(getattr(rollout, "plan_version", "") or ""),
        exposure_gap=gap,
        stage_funnels=[
            StageFunnel(i, s.ppm, _funnel(per_stage.get(i, 0), [x for x in stats if x.stage == i]))
            for i, s in enumerate(plan.stages)
        ],
        failures_by_cohort=[
            FailureByCohort(reason, d, v, n)
            for (reason, d, v), n in sorted(failures_by_cohort.items())
            if n
        ],
        adoption_curve=_curve(stats),
        latencies=[_latency("install", "INSTALLED", stats), _latency("first_use", "ACTIVE", stats)],
        health=_health(stats, plan.holdout_ppm),
        stragglers=stragglers,
    )


def _stats(session: Session, rollout_id: str) -> list[_Stat]:
    # Core rows, not ORM objects: a report reads every aggregate row of the rollout.
    table: Table = AdoptionStatRow.__table__  # type: ignore[attr-defined]
    query = table.select().with_only_columns(
        table.c.metric,
        table.c.key,
        table.c.stage,
        table.c.model,
        table.c.region,
        table.c.firmware,
        table.c.bucket,
        table.c.value,
    )
    return [_Stat(*r) for r in session.execute(query.where(table.c.rollout_id == rollout_id))]


def _cohorts(stats: list[_Stat], exposure: dict[tuple[str, str], int]) -> list[Cohort]:
    active: dict[tuple[str, str], int] = defaultdict(int)
    failed: dict[tuple[str, str], int] = defaultdict(int)
    installed: dict[tuple[str, str], int] = defaultdict(int)
    for s in stats:
        for d in DIMENSIONS:
            key = (d, s.dim(d))
            if s.metric == "state" and s.key == "ACTIVE":
                active[key] += s.value
            elif s.metric == "failed":
                failed[key] += s.value
            elif s.metric == "reached" and s.key == "INSTALLED":
                installed[key] += s.value
    return [
        Cohort(d, v, n, active[(d, v)], failed[(d, v)], installed[(d, v)])
        for d in DIMENSIONS
        for (dd, v), n in sorted(exposure.items())
        if dd == d
    ]


def _curve(stats: list[_Stat]) -> list[AdoptionPoint]:
    """Cumulative devices per time bucket that became active, installed, failed, reverted."""
    per_bucket: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in stats:
        if s.metric == "reached" and s.key in ("ACTIVE", "INSTALLED"):
            per_bucket[s.bucket][s.key] += s.value
        elif s.metric == "entered":
            per_bucket[s.bucket]["FAILED" if s.key == "FAILED" else "reverted"] += s.value
    points: list[AdoptionPoint] = []
    totals: dict[str, int] = defaultdict(int)
    for bucket in sorted(per_bucket):
        for k, v in per_bucket[bucket].items():
            totals[k] += v
        points.append(
            AdoptionPoint(
                bucket_time(bucket) + timedelta(seconds=TIME_BUCKET_SECONDS),
                totals["ACTIVE"],
                totals["INSTALLED"],
                totals["FAILED"],
                totals["reverted"],
            )
        )
    return points


def _latency(name: str, step: str, stats: list[_Stat]) -> Latency:
    histogram: dict[int, int] = defaultdict(int)
    for s in stats:
        if s.metric == "latency" and s.key == step:
            histogram[s.bucket] += s.value
    return Latency(
        name,
        sum(histogram.values()),
        percentile_seconds(histogram, 0.5),
        percentile_seconds(histogram, 0.9),
        percentile_seconds(histogram, 0.99),
    )


def _health(stats: list[_Stat], holdout_ppm: int) -> HealthComparison:
    sums: dict[str, int] = defaultdict(int)
    control: dict[str, int] = defaultdict(int)
    for s in stats:
        if s.metric == "health":
            sums[s.key] += s.value
        elif s.metric == adoption.HOLDOUT_HEALTH:
            control[s.key] += s.value
        elif s.metric == "reached" and s.key == "ACTIVE":
            sums["devices"] += s.value
    exposed = _health_group("exposed", sums["devices"], sums)
    if not holdout_ppm:
        return HealthComparison(exposed, None, NO_HOLDOUT)
    if not control["samples"]:
        note = (
            f"holdout of {holdout_ppm / 10_000:g}% configured; no health samples from its "
            "devices yet, so there is no control figure"
        )
        return HealthComparison(exposed, None, note)
    # Holdout devices are recognised per sample, not enumerated: their count is not kept.
    note = f"holdout of {holdout_ppm / 10_000:g}%: rates per health sample, exposed vs holdout"
    return HealthComparison(exposed, _health_group("holdout", 0, control), note)


def _health_group(name: str, devices: int, sums: dict[str, int]) -> HealthGroup:
    samples = sums["samples"]
    return HealthGroup(
        name,
        devices,
        samples,
        sums["crashes"],
        sums["feature_errors"],
        sums["unhealthy_samples"] * PPM_MAX // samples if samples else 0,
    )


def _stragglers(session: Session, rollout_id: str, now: datetime) -> Stragglers:
    """Exposed devices not done yet (neither settled nor failed), by reachability."""
    # Listing the states not done (not a NOT IN) lets the (rollout_id, state) index
    # find the stragglers alone: the cost is theirs, not the exposed devices'.
    not_done = [s for s in ALL_STATES if s not in (*SETTLED, "FAILED")]
    rows = session.exec(
        select(DeviceRow.online, DeviceRow.last_seen_at, RolloutDeviceRow.reason)
        .join(RolloutDeviceRow, col(DeviceRow.device_id) == col(RolloutDeviceRow.device_id))
        .where(RolloutDeviceRow.rollout_id == rollout_id)
        .where(col(RolloutDeviceRow.state).in_(not_done))
    ).all()
    histogram = dict.fromkeys(LAST_SEEN_BUCKETS, 0)
    unreachable = waiting = 0
    for online, last_seen, reason in rows:
        if not online:
            unreachable += 1
        waiting += is_waiting(reason)
        histogram[_last_seen_bucket(now, last_seen)] += 1
    return Stragglers(unreachable, len(rows) - unreachable, histogram, waiting)


def _last_seen_bucket(now: datetime, last_seen: datetime | None) -> str:
    if last_seen is None:
        return "never"
    age = (utc(now) - utc(last_seen)).total_seconds()
    for limit, name in ((60, "<1m"), (600, "1-10m"), (3600, "10-60m"), (86_400, "1-24h")):
        if age < limit:
            return name
    return ">1d"


def build_feature_report(session: Session, feature: str, now: datetime) -> FeatureReport:
    """Which versions of a feature devices run, over time, across all its rollouts."""
    rows = session.exec(
        select(FeatureVersionStatRow)
        .where(FeatureVersionStatRow.feature == feature)
        .order_by(col(FeatureVersionStatRow.bucket))
    ).all()
    buckets = sorted({r.bucket for r in rows})
    deltas: dict[str, dict[int, int]] = defaultdict(dict)
    for r in rows:
        deltas[r.version][r.bucket] = r.value
    series: list[VersionSeries] = []
    for version in sorted(deltas):
        running = 0
        points: list[tuple[datetime, int]] = []
        for b in buckets:
            running += deltas[version].get(b, 0)
            points.append((bucket_time(b) + timedelta(seconds=TIME_BUCKET_SECONDS), running))
        series.append(VersionSeries(version, points, running))
    feature_rollouts = session.exec(
        select(RolloutRow).where(RolloutRow.feature == feature).order_by(col(RolloutRow.created_at))
    ).all()
    return FeatureReport(feature, now, series, list(feature_rollouts))
