"""Table rows and report values to ota.v1 messages."""

from __future__ import annotations

import json
from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ota.clock import utc
from ota.domain.plan import RolloutPlan
from ota.reports.model import AdoptionReport
from ota.store.models import BundleRow, DeviceEventRow, DeviceRow, RolloutAuditRow, RolloutRow
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2, report_pb2, rollout_pb2

_GATE_ACTIONS = {
    "pause": rollout_pb2.GATE_ACTION_PAUSE,
    "rollback": rollout_pb2.GATE_ACTION_ROLLBACK,
}


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


def rollout(
    row: RolloutRow,
    *,
    device_states: dict[str, int] | None = None,
    stage_exposure: dict[int, int] | None = None,
    eligible: int = 0,
) -> rollout_pb2.Rollout:
    plan = RolloutPlan.from_json(row.stages_json, row.gate_json)
    states = device_states or {}
    exposure = stage_exposure or {}
    return rollout_pb2.Rollout(
        name=f"rollouts/{row.rollout_id}",
        rollout_id=row.rollout_id,
        feature=row.feature,
        version=row.version,
        bundle=row.bundle_name,
        selector=row.selector,
        stages=[
            rollout_pb2.Stage(ppm=s.ppm, min_soak_seconds=s.min_soak_seconds) for s in plan.stages
        ],
        gate=rollout_pb2.FailureGate(
            max_failure_ppm=plan.gate.max_failure_ppm,
            min_sample=plan.gate.min_sample,
            action=_GATE_ACTIONS[plan.gate.action],
        ),
        state=rollout_state(row.state),
        current_stage=row.current_stage,
        stage_started_time=ts(row.stage_started_at),
        salt_hex=row.salt_hex,
        eligible=eligible,
        exposed=sum(states.values()),
        progress=[
            rollout_pb2.StageProgress(ppm=s.ppm, exposed=exposure.get(i, 0))
            for i, s in enumerate(plan.stages)
        ],
        state_reason=row.state_reason,
        create_time=ts(row.created_at),
        update_time=ts(row.updated_at),
        etag=str(row.revision),
        device_states=states,
    )


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
    )


def report(value: AdoptionReport, states: dict[str, int]) -> report_pb2.RolloutReport:
    return report_pb2.RolloutReport(
        rollout=rollout(
            value.rollout,
            device_states=states,
            stage_exposure={i: n for i, (_, n) in enumerate(value.stages)},
            eligible=value.eligible,
        ),
        generated_time=ts(value.generated_at),
        data_time=ts(value.data_time),
        eligible=value.eligible,
        target_exposed=value.target_exposed,
        exposed=value.exposed,
        funnel=[
            report_pb2.FunnelStep(step=step, devices=n, conversion_ppm=value.conversion_ppm(i))
            for i, (step, n) in enumerate(value.funnel)
        ],
        current_states=[
            report_pb2.CountByKey(key=k, count=n) for k, n in value.current_states.items()
        ],
        failures_by_reason=[
            report_pb2.CountByKey(key=k, count=n) for k, n in value.failures_by_reason.items()
        ],
        cohorts=[
            report_pb2.CohortBreakdown(
                dimension=c.dimension,
                value=c.value,
                exposed=c.exposed,
                active=c.active,
                failed=c.failed,
            )
            for c in value.cohorts
        ],
        timeline=[audit(a) for a in value.timeline],
        events_ingested=value.events_ingested,
    )
