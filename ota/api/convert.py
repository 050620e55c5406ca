"""Table rows and report values to ota.v1 messages."""

from __future__ import annotations

import json
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ota.clock import utc
from ota.domain.plan import RolloutPlan
from ota.reports.model import AdoptionReport, FeatureReport, FunnelStep, HealthGroup
from ota.rollout.preview import Breakdown, PlanPreview
from ota.store.models import (
    BundleRow,
    DeviceEventRow,
    DeviceRow,
    RolloutAuditRow,
    RolloutDeviceRow,
    RolloutRow,
)
from ota.store.rollouts import stage_starts
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2, report_pb2, rollout_pb2

_GATE_ACTIONS = {
    "pause": rollout_pb2.GATE_ACTION_PAUSE,
    "hold": rollout_pb2.GATE_ACTION_HOLD,
    "rollback": rollout_pb2.GATE_ACTION_ROLLBACK,
}


_U32_MAX = 2**32 - 1


def _u32(value: int) -> int:
    """A plan value for a uint32 field. New plans are bounded well below; a row stored
    before the bounds may hold more, and must not make every reply that carries it fail."""
    return min(max(value, 0), _U32_MAX)


def ts(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    out = Timestamp()
    out.FromDatetime(utc(when))
    return out


def rollout_state(name: str) -> rollout_pb2.RolloutState.ValueType:
    return rollout_pb2.RolloutState.Value(f"ROLLOUT_STATE_{name}")


def bundle(row: BundleRow) -> bundle_pb2.Bundle:
    return bundle_pb2.Bundle(
        name=row.name,
        feature=row.feature,
        version=row.version,
        target_path=row.target_path,
        sha256=bytes.fromhex(row.sha256),
        length=row.length,
        models=json.loads(row.models_json),
        min_firmware=row.min_firmware,
        signer_keyids=json.loads(row.signer_keyids_json),
        create_time=ts(row.created_at),
    )


def device(row: DeviceRow) -> fleet_pb2.Device:
    return fleet_pb2.Device(
        name=f"devices/{row.device_id}",
        device_id=row.device_id,
        model=row.model,
        region=row.region,
        firmware=row.firmware,
        labels=json.loads(row.labels_json),
        revoked=row.revoked,
        create_time=ts(row.created_at),
        last_seen_time=ts(row.last_seen_at),
        online=row.online,
        identity=(
            fleet_pb2.DEVICE_IDENTITY_CERTIFICATE
            if row.identity == "certificate"
            else fleet_pb2.DEVICE_IDENTITY_PASSWORD
        ),
        certificate_serial=row.cert_serial,
        certificate_expire_time=ts(row.cert_not_after) if row.cert_not_after else None,
    )


def device_event(row: DeviceEventRow) -> common_pb2.DeviceEvent:
    return common_pb2.DeviceEvent(
        device_id=row.device_id,
        seq=row.seq,
        rollout_id=row.rollout_id,
        bundle_sha256=bytes.fromhex(row.bundle_sha256),
        state=common_pb2.DeviceState.Value(row.state),
        error_code=common_pb2.FailureReason.Value(row.error_code or "FAILURE_REASON_UNSPECIFIED"),
        detail=row.detail,
        time=ts(row.device_time or row.received_at),
        feature=row.feature,
        version=row.version,
    )


def rollout_device(row: RolloutDeviceRow, detail: str) -> rollout_pb2.RolloutDevice:
    known = row.reason in common_pb2.FailureReason.DESCRIPTOR.values_by_name
    return rollout_pb2.RolloutDevice(
        device_id=row.device_id,
        model=row.model,
        region=row.region,
        stage=row.stage,
        state=common_pb2.DeviceState.Value(row.state),
        reason=common_pb2.FailureReason.Value(row.reason)
        if known
        else common_pb2.FAILURE_REASON_UNSPECIFIED,
        # A reason this version does not know by name still reaches the operator.
        detail=detail or ("" if known or not row.reason else row.reason),
        expose_time=ts(row.exposed_at),
        update_time=ts(row.updated_at),
    )


def rollout(
    row: RolloutRow,
    *,
    device_states: dict[str, int] | None = None,
    stage_exposure: dict[int, int] | None = None,
    eligible: int = 0,
    holdout: int = 0,
    stage_started: dict[int, datetime] | None = None,
) -> rollout_pb2.Rollout:
    plan = RolloutPlan.from_json(row.stages_json, row.gate_json)
    states = device_states or {}
    exposure = stage_exposure or {}
    started = dict(stage_started or {})
    if row.current_stage >= 0 and row.stage_started_at is not None:
        # The row's own time for the current stage, so it reads as `stage_started_time`.
        started[row.current_stage] = row.stage_started_at
    return rollout_pb2.Rollout(
        name=f"rollouts/{row.rollout_id}",
        rollout_id=row.rollout_id,
        feature=row.feature,
        version=row.version,
        bundle=row.bundle_name,
        selector=row.selector,
        stages=[
            rollout_pb2.Stage(
                ppm=s.ppm,
                min_soak_seconds=_u32(s.min_soak_seconds),
                min_exposed=_u32(s.min_exposed),
                deadline_seconds=_u32(s.deadline_seconds),
                advance=s.advance,
                name=s.label,
            )
            for s in plan.stages
        ],
        gate=_install_gate(plan),
        state=rollout_state(row.state),
        current_stage=row.current_stage,
        stage_started_time=ts(row.stage_started_at),
        salt_hex=row.salt_hex,
        eligible=eligible,
        holdout=holdout,
        exposed=sum(states.values()),
        progress=[
            rollout_pb2.StageProgress(
                ppm=s.ppm, exposed=exposure.get(i, 0), started_time=ts(started.get(i))
            )
            for i, s in enumerate(plan.stages)
        ],
        state_reason=row.state_reason,
        create_time=ts(row.created_at),
        update_time=ts(row.updated_at),
        etag=str(row.revision),
        device_states=states,
        plan_version=row.plan_version,
        phase=row.phase if row.state == "RUNNING" else "",
        holdout_ppm=plan.holdout_ppm,
        plan_json=json.dumps(plan.to_dict(), sort_keys=True),
    )


def _install_gate(plan: RolloutPlan) -> rollout_pb2.FailureGate | None:
    """The first install-failure gate, in the legacy single-gate field."""
    for gate in plan.gates:
        if gate.metric == "install_failure":
            return rollout_pb2.FailureGate(
                max_failure_ppm=gate.max_ppm,
                min_sample=_u32(gate.min_sample),
                action=_GATE_ACTIONS[gate.action],
            )
    return None


def audit(row: RolloutAuditRow) -> rollout_pb2.RolloutEvent:
    return rollout_pb2.RolloutEvent(
        id=row.id or 0,
        rollout_id=row.rollout_id,
        time=ts(row.time),
        actor=row.actor,
        action=row.action,
        from_state=rollout_state(row.from_state),
        to_state=rollout_state(row.to_state),
        stage=row.stage,
        reason=row.reason,
        diff_json=json.dumps(row.diff, sort_keys=True) if row.diff else "",
    )


def plan_preview(value: PlanPreview) -> rollout_pb2.RolloutPlanPreview:
    def counts(items: tuple[Breakdown, ...]) -> list[rollout_pb2.PreviewCount]:
        return [
            rollout_pb2.PreviewCount(dimension=b.dimension, value=b.value, devices=b.devices)
            for b in items
        ]

    return rollout_pb2.RolloutPlanPreview(
        rollout_id=value.rollout_id,
        plan_version=value.plan_version,
        fleet=value.fleet,
        candidates=value.candidates,
        stages=[
            rollout_pb2.StagePreview(
                index=s.index,
                label=s.label,
                ppm=s.ppm,
                exposed=s.exposed,
                new=s.new,
                cohorts=counts(s.cohorts),
            )
            for s in value.stages
        ],
        excluded=[
            rollout_pb2.Exclusion(
                reason=reason, devices=n, cohorts=counts(value.excluded_cohorts[reason])
            )
            for reason, n in value.excluded.items()
        ],
        already_exposed=value.already_exposed,
    )


def _steps(steps: list[FunnelStep]) -> list[report_pb2.FunnelStep]:
    return [
        report_pb2.FunnelStep(
            step=f.step,
            devices=f.devices,
            conversion_ppm=f.conversion_ppm,
            median_step_seconds=f.median_step_seconds,
        )
        for f in steps
    ]


def _counts(values: dict[str, int]) -> list[report_pb2.CountByKey]:
    return [report_pb2.CountByKey(key=k, count=n) for k, n in values.items()]


def _health_group(g: HealthGroup | None) -> report_pb2.HealthGroup | None:
    if g is None:
        return None
    return report_pb2.HealthGroup(
        name=g.name,
        devices=g.devices,
        samples=g.samples,
        crashes=g.crashes,
        feature_errors=g.feature_errors,
        unhealthy_ppm=g.unhealthy_ppm,
        samples_used=g.samples_used,
        uses=g.uses,
    )


def report(value: AdoptionReport, states: dict[str, int]) -> report_pb2.RolloutReport:
    gap, health, stragglers = value.exposure_gap, value.health, value.stragglers
    return report_pb2.RolloutReport(
        rollout=rollout(
            value.rollout,
            device_states=states,
            stage_exposure={i: n for i, (_, n) in enumerate(value.stages)},
            eligible=value.eligible,
            holdout=value.exposure_gap.holdout if value.exposure_gap else 0,
            stage_started=stage_starts(value.timeline),
        ),
        generated_time=ts(value.generated_at),
        data_time=ts(value.data_time),
        eligible=value.eligible,
        target_exposed=value.target_exposed,
        exposed=value.exposed,
        funnel=_steps(value.funnel),
        current_states=_counts(value.current_states),
        failures_by_reason=_counts(value.failures_by_reason),
        cohorts=[
            report_pb2.CohortBreakdown(
                dimension=c.dimension,
                value=c.value,
                exposed=c.exposed,
                active=c.active,
                failed=c.failed,
                installed=c.installed,
                used=c.used,
                samples=c.samples,
                samples_used=c.samples_used,
                holdout_devices_used=c.holdout_devices_used,
                holdout_samples=c.holdout_samples,
                holdout_samples_used=c.holdout_samples_used,
            )
            for c in value.cohorts
        ],
        timeline=[audit(a) for a in value.timeline],
        events_ingested=value.events_ingested,
        signer_keyids=value.signer_keyids,
        plan_version=value.plan_version,
        exposure_gap=report_pb2.ExposureGap(
            target=gap.target,
            exposed=gap.exposed,
            applied=gap.applied,
            reasons=_counts(gap.reasons),
            holdout=gap.holdout,
            reverted=gap.reverted,
        )
        if gap
        else None,
        stage_funnels=[
            report_pb2.StageFunnel(stage=f.stage, ppm=f.ppm, steps=_steps(f.steps))
            for f in value.stage_funnels
        ],
        failures_by_cohort=[
            report_pb2.FailureByCohort(
                reason=f.reason, dimension=f.dimension, value=f.value, devices=f.devices
            )
            for f in value.failures_by_cohort
        ],
        adoption_curve=[
            report_pb2.AdoptionPoint(
                time=ts(p.time),
                active=p.active,
                installed=p.installed,
                failed=p.failed,
                reverted=p.reverted,
                used=p.used,
            )
            for p in value.adoption_curve
        ],
        usage_curve=[
            report_pb2.UsagePoint(
                time=ts(p.time),
                samples=p.samples,
                samples_used=p.samples_used,
                holdout_samples=p.holdout_samples,
                holdout_samples_used=p.holdout_samples_used,
            )
            for p in value.usage_curve
        ],
        labels=[
            report_pb2.LabelSegment(
                label=x.label,
                exposed=x.exposed,
                applied=x.applied,
                used=x.used,
                holdout_devices=x.holdout_devices,
                holdout_used=x.holdout_used,
            )
            for x in value.labels
        ],
        outcome=audit(value.outcome) if value.outcome else None,
        curve_resolution_seconds=value.curve_resolution_seconds,
        latencies=[
            report_pb2.Latency(
                name=x.name,
                devices=x.devices,
                p50_seconds=x.p50_seconds,
                p90_seconds=x.p90_seconds,
                p99_seconds=x.p99_seconds,
            )
            for x in value.latencies
        ],
        health=report_pb2.HealthComparison(
            exposed=_health_group(health.exposed),
            control=_health_group(health.control),
            note=health.note,
        )
        if health
        else None,
        stragglers=report_pb2.Stragglers(
            unreachable=stragglers.unreachable,
            reachable_not_applied=stragglers.reachable_not_applied,
            last_seen=_counts(stragglers.last_seen),
            waiting_for_control_plane=stragglers.waiting_for_control_plane,
        )
        if stragglers
        else None,
    )


def feature_report(value: FeatureReport) -> report_pb2.FeatureReport:
    return report_pb2.FeatureReport(
        feature=value.feature,
        generated_time=ts(value.generated_at),
        versions=[
            report_pb2.VersionSeries(
                version=v.version,
                points=[report_pb2.VersionPoint(time=ts(t), devices=n) for t, n in v.points],
                devices_now=v.devices_now,
            )
            for v in value.versions
        ],
        rollouts=[rollout(r) for r in value.rollouts],
    )
