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

from sqlalchemy import Table, func
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
from ota.domain.states import (
    ABORTED,
    ALL_STATES,
    DELETED,
    FAILURE_REASONS,
    FUNNEL,
    KILLED,
    PAUSED,
    ROLLED_BACK,
    SETTLED,
)
from ota.reports.figures import MAX_LABELS, OTHER_LABELS
from ota.rollout.exposure import holdout_by_label, holdout_count, reported_eligible
from ota.store import adoption, bundles, rollouts, segments
from ota.store.models import (
    AdoptionStatRow,
    DeviceRow,
    FeatureVersionStatRow,
    RolloutAuditRow,
    RolloutDeviceRow,
    RolloutRow,
)

DIMENSIONS = ("model", "region", "firmware")
# The funnel of a report: the device steps, then "used" (a health sample reported a use).
USED = "USED"
REPORT_FUNNEL = (*FUNNEL, USED)
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
    used: int = 0
    samples: int = 0
    samples_used: int = 0
    holdout_devices_used: int = 0
    holdout_samples: int = 0
    holdout_samples_used: int = 0


@dataclass(frozen=True)
class LabelSegment:
    """Devices carrying one `key=value` label (or OTHER_LABELS: the rest, summed)."""

    label: str
    exposed: int
    applied: int
    used: int
    holdout_devices: int
    holdout_used: int


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
    holdout: int = 0
    reverted: int = 0


@dataclass(frozen=True)
class AdoptionPoint:
    time: datetime
    active: int
    installed: int
    failed: int
    reverted: int
    used: int = 0


@dataclass(frozen=True)
class UsagePoint:
    time: datetime
    samples: int
    samples_used: int
    holdout_samples: int
    holdout_samples_used: int


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
    samples_used: int = 0
    uses: int = 0


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
    outcome: RolloutAuditRow | None = None
    curve_resolution_seconds: int = TIME_BUCKET_SECONDS
    usage_curve: list[UsagePoint] = field(default_factory=list)
    labels: list[LabelSegment] = field(default_factory=list)


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
        elif s.metric == adoption.USED:
            reached[USED] += s.value
    steps: list[FunnelStep] = []
    previous: int | None = None
    for step in REPORT_FUNNEL:
        n = exposed if step == "TARGETED" else reached[step]
        timed = step not in ("TARGETED", USED)
        median = percentile_seconds(step_times[step], 0.5) if timed else 0.0
        steps.append(FunnelStep(step, n, _conversion(n, previous), median))
        previous = n
    return steps


def build_report(session: Session, rollout_id: str, now: datetime) -> AdoptionReport:
    """The adoption report of one rollout, as of `now`."""
    rollout = rollouts.get_rollout(session, rollout_id)
    plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
    bundle = bundles.get_bundle(session, rollout.bundle_name)
    eligible = reported_eligible(session, rollout, bundle)
    holdout = holdout_count(session, rollout, bundle, eligible)
    current_ppm = plan.stages[rollout.current_stage].ppm if rollout.current_stage >= 0 else 0
    stats = _stats(session, rollout_id)
    per_stage: dict[int, int] = defaultdict(int)
    cohort_exposure: dict[tuple[str, str], int] = defaultdict(int)
    reported: dict[str, int] = defaultdict(int)
    reasons: dict[str, int] = defaultdict(int)
    failures_by_cohort: dict[tuple[str, str, str], int] = defaultdict(int)
    installed_ever = 0
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
        elif s.metric == "reached" and s.key == "INSTALLED":
            installed_ever += s.value
    exposed = sum(per_stage.values())
    # `state` counts devices that reported, by state; the rest of the exposed are TARGETED.
    states = {k: v for k, v in reported.items() if v and k != "TARGETED"}
    if exposed - sum(states.values()):
        states["TARGETED"] = exposed - sum(states.values())
    # The stage's share of the eligible fleet; the holdout (the top of hash space)
    # is never part of it, so at 100 % the target is every eligible device outside it.
    target = min(eligible * current_ppm // PPM_MAX, eligible - holdout)
    stragglers = _stragglers(session, rollout_id, now)
    series = _Series.read(session, rollout_id)
    not_notified = states.get("TARGETED", 0)
    applied = states.get("INSTALLED", 0) + states.get("ACTIVE", 0)
    settled_reverted = states.get("ROLLED_BACK", 0) + states.get("DEACTIVATED", 0)
    # Reverted after installing: reached INSTALLED and runs it no more. The other
    # reverted devices never installed it: they failed (the revert came after).
    reverted = max(0, min(settled_reverted, installed_ever - applied))
    in_progress = max(
        0, exposed - not_notified - states.get("FAILED", 0) - applied - settled_reverted
    )
    failed = max(0, exposed - not_notified - in_progress - applied - reverted)
    gap = ExposureGap(
        target=target,
        exposed=exposed,
        applied=applied,
        reasons={
            "not_yet_notified": not_notified,
            "in_progress": in_progress,
            "failed": failed,
            "reverted": reverted,
            "offline": stragglers.unreachable,
            "rounding": target - exposed,
        },
        holdout=holdout,
        reverted=reverted,
    )
    timeline = rollouts.audit_log(session, rollout_id)
    return AdoptionReport(
        rollout=rollout,
        generated_at=now,
        data_time=series.data_time,
        eligible=eligible,
        target_exposed=target,
        exposed=exposed,
        funnel=_funnel(exposed, stats),
        current_states=dict(sorted(states.items())),
        failures_by_reason=dict(sorted((k, v) for k, v in reasons.items() if v)),
        cohorts=_cohorts(stats, cohort_exposure),
        timeline=timeline,
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
        adoption_curve=series.points,
        latencies=[_latency("install", "INSTALLED", stats), _latency("first_use", "ACTIVE", stats)],
        health=_health(stats, plan.holdout_ppm, holdout),
        stragglers=stragglers,
        outcome=_outcome(rollout, timeline),
        curve_resolution_seconds=series.resolution,
        usage_curve=_usage_curve(stats, series),
        labels=bounded_labels(
            segments.usage_by_label(session, rollout_id),
            holdout_by_label(session, rollout, bundle, eligible) if holdout else {},
        ),
    )


def bounded_labels(rows: list[segments.LabelUsage], holdout: dict[str, int]) -> list[LabelSegment]:
    """Per label, the first MAX_LABELS by devices (exposed and holdout), then OTHER_LABELS.

    A device carries several labels, so the rows overlap; the OTHER_LABELS row
    sums the remaining labels' figures as they are (device-label pairs).
    """
    by_label = {r.label: r for r in rows}
    zero = segments.LabelUsage("", 0, 0, 0, 0)
    every = [
        LabelSegment(
            name,
            r.exposed,
            r.applied,
            r.used,
            holdout.get(name, 0),
            r.holdout_used,
        )
        for name in set(by_label) | set(holdout)
        for r in [by_label.get(name, zero)]
    ]
    every.sort(key=lambda s: (-(s.exposed + s.holdout_devices), s.label))
    kept, rest = every[:MAX_LABELS], every[MAX_LABELS:]
    if rest:
        kept.append(
            LabelSegment(
                OTHER_LABELS,
                *(sum(getattr(s, f) for s in rest) for f in _LABEL_FIGURES),
            )
        )
    return kept


_LABEL_FIGURES = ("exposed", "applied", "used", "holdout_devices", "holdout_used")


def _outcome(rollout: RolloutRow, timeline: list[RolloutAuditRow]) -> RolloutAuditRow | None:
    """The audit entry that put the rollout in its state, when that state is a stop."""
    if rollout.state not in (ROLLED_BACK, KILLED, ABORTED, PAUSED):
        return None
    for row in reversed(timeline):
        if row.to_state == rollout.state and row.from_state != rollout.state:
            return row
    return None


# Seconds per point of a curve, from the finest up: the smallest that draws the
# rollout's length in at most CURVE_POINTS points.
RESOLUTIONS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21_600, 86_400)
CURVE_POINTS = 120


def fit_resolution(span_seconds: int) -> int:
    for r in RESOLUTIONS:
        if span_seconds <= r * CURVE_POINTS:
            return r
    return RESOLUTIONS[-1]


@dataclass(frozen=True)
class _Series:
    """The per-second `curve` aggregate of one rollout, binned to fit its length."""

    start: int
    resolution: int
    data_time: datetime | None
    points: list[AdoptionPoint]

    @classmethod
    def read(cls, session: Session, rollout_id: str) -> _Series:
        table: Table = AdoptionStatRow.__table__  # type: ignore[attr-defined]
        mine = (table.c.rollout_id == rollout_id, table.c.metric == adoption.CURVE)
        bounds = session.execute(
            table.select()
            .with_only_columns(func.min(table.c.bucket), func.max(table.c.bucket))
            .where(*mine)
        ).one()
        if bounds[0] is None:
            return cls(0, 1, None, [])
        first, last = int(bounds[0]), int(bounds[1])
        resolution = fit_resolution(last - first + 1)
        start = first - first % resolution
        slot = (table.c.bucket - start) // resolution
        rows = session.execute(
            table.select()
            .with_only_columns(table.c.key, slot, func.sum(table.c.value))
            .where(*mine)
            .group_by(table.c.key, slot)
        ).all()
        newest = session.execute(
            table.select()
            .with_only_columns(func.max(table.c.bucket))
            .where(*mine, table.c.key == "events")
        ).scalar()
        per_slot: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for key, i, value in rows:
            per_slot[int(i)][key] += int(value)
        totals: dict[str, int] = defaultdict(int)
        # The curve starts at 0, at the start of its first slot.
        points = [AdoptionPoint(bucket_time(start), 0, 0, 0, 0, 0)]
        for i in range(max(per_slot) + 1):
            for k, v in per_slot.get(i, {}).items():
                totals[k] += v
            points.append(
                AdoptionPoint(
                    bucket_time(start + (i + 1) * resolution),
                    totals["ACTIVE"],
                    totals["INSTALLED"],
                    totals["FAILED"],
                    totals["reverted"],
                    totals["USED"],
                )
            )
        data_time = bucket_time(int(newest)) if newest is not None else None
        return cls(start, resolution, data_time, points)


def _usage_curve(stats: list[_Stat], series: _Series) -> list[UsagePoint]:
    """Share of health samples reporting a use, per slot of at least the aggregates' minute."""
    resolution = max(series.resolution, TIME_BUCKET_SECONDS)
    slots: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for s in stats:
        if s.metric not in (adoption.HEALTH, adoption.HOLDOUT_HEALTH):
            continue
        if s.key not in ("samples", "samples_used"):
            continue
        index = (0 if s.metric == adoption.HEALTH else 2) + (s.key == "samples_used")
        slots[s.bucket - s.bucket % resolution][index] += s.value
    return [
        UsagePoint(bucket_time(b + resolution), *slots[b])
        for b in sorted(slots)
        if slots[b][0] or slots[b][2]
    ]


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
    query = query.where(table.c.rollout_id == rollout_id, table.c.metric != adoption.CURVE)
    return [_Stat(*r) for r in session.execute(query)]


def _cohorts(stats: list[_Stat], exposure: dict[tuple[str, str], int]) -> list[Cohort]:
    figures: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for s in stats:
        name = _COHORT_FIGURE.get((s.metric, s.key))
        if name is None:
            continue
        for d in DIMENSIONS:
            figures[(d, s.dim(d))][name] += s.value
    keys = set(exposure) | {k for k, v in figures.items() if v.get("holdout_samples")}
    return [
        Cohort(
            d,
            v,
            exposure.get((d, v), 0),
            **{name: figures[(d, v)][name] for name in _COHORT_FIELDS},
        )
        for d in DIMENSIONS
        for (dd, v) in sorted(keys)
        if dd == d
    ]


# (metric, key) of the aggregates -> the cohort figure they add to ("failed": any key).
_COHORT_FIGURE = {
    ("state", "ACTIVE"): "active",
    ("reached", "INSTALLED"): "installed",
    (adoption.USED, ""): "used",
    (adoption.HEALTH, "samples"): "samples",
    (adoption.HEALTH, "samples_used"): "samples_used",
    (adoption.HOLDOUT_USED, ""): "holdout_devices_used",
    (adoption.HOLDOUT_HEALTH, "samples"): "holdout_samples",
    (adoption.HOLDOUT_HEALTH, "samples_used"): "holdout_samples_used",
    **{("failed", r): "failed" for r in FAILURE_REASONS},
}
_COHORT_FIELDS = (
    "active",
    "failed",
    "installed",
    "used",
    "samples",
    "samples_used",
    "holdout_devices_used",
    "holdout_samples",
    "holdout_samples_used",
)


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


def _health(stats: list[_Stat], holdout_ppm: int, holdout_devices: int) -> HealthComparison:
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
            f"holdout of {holdout_ppm / 10_000:g}% ({holdout_devices} devices) configured; no "
            "health samples from its devices yet, so there is no control figure"
        )
        return HealthComparison(exposed, None, note)
    note = (
        f"holdout of {holdout_ppm / 10_000:g}%: {holdout_devices} devices; rates per health "
        "sample, exposed (devices that activated it) vs holdout"
    )
    return HealthComparison(exposed, _health_group("holdout", holdout_devices, control), note)


def _health_group(name: str, devices: int, sums: dict[str, int]) -> HealthGroup:
    samples = sums["samples"]
    return HealthGroup(
        name,
        devices,
        samples,
        sums["crashes"],
        sums["feature_errors"],
        sums["unhealthy_samples"] * PPM_MAX // samples if samples else 0,
        sums["samples_used"],
        sums["uses"],
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
        select(RolloutRow)
        .where(RolloutRow.feature == feature)
        .where(col(RolloutRow.state) != DELETED)
        .order_by(col(RolloutRow.created_at))
    ).all()
    return FeatureReport(feature, now, series, list(feature_rollouts))
