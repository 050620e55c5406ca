"""Who a rollout exposes: eligible devices, outside the holdout, under the stage.

One classification serves the engine (who to expose now) and the dry run (who
each stage would expose, who is left out and why), so the two never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from ota.domain.bucketing import is_control, is_exposed
from ota.domain.plan import RolloutPlan, Stage
from ota.domain.selector import DeviceAttributes, Selector
from ota.domain.states import DRAFT
from ota.domain.version import Version
from ota.errors import InvalidArgument
from ota.rollout.notify import DesiredStateSigner, issue_desired_states
from ota.store import desired, fleet, rollouts
from ota.store.models import BundleRow, DeviceRow, RolloutRow

# Why a device of the fleet is left out of a rollout.
NOT_ELIGIBLE = "not_eligible"  # the selector does not match it, or it is revoked
INCOMPATIBLE = "incompatible"  # the bundle was not signed for its model or firmware
HOLDOUT = "holdout"  # the control group: never exposed, compared against


@dataclass(frozen=True)
class Candidate:
    """A device that the rollout may expose: eligible and outside the holdout."""

    device: DeviceRow
    labels: dict[str, str]


def compatible(device: DeviceRow | DeviceAttributes, bundle: BundleRow) -> bool:
    models = set(json.loads(bundle.models_json))
    if models and device.model not in models:
        return False
    if not bundle.min_firmware:
        return True
    try:
        return Version.parse(device.firmware) >= Version.parse(bundle.min_firmware)
    except InvalidArgument:
        return False


def classify(
    devices: list[DeviceRow], rollout: RolloutRow, bundle: BundleRow, plan: RolloutPlan
) -> tuple[list[Candidate], dict[str, list[DeviceRow]]]:
    """Split devices into candidates and the excluded, by reason."""
    selector = Selector.parse(rollout.selector)
    salt = bytes.fromhex(rollout.salt_hex)
    candidates: list[Candidate] = []
    excluded: dict[str, list[DeviceRow]] = {NOT_ELIGIBLE: [], INCOMPATIBLE: [], HOLDOUT: []}
    for device in devices:
        attributes = fleet.attributes(device)
        if device.revoked or not selector.matches(attributes):
            excluded[NOT_ELIGIBLE].append(device)
        elif not compatible(device, bundle):
            excluded[INCOMPATIBLE].append(device)
        elif plan.holdout_ppm and is_control(salt, device.device_id, plan.holdout_ppm):
            excluded[HOLDOUT].append(device)
        else:
            candidates.append(Candidate(device, dict(attributes.labels)))
    return candidates, excluded


def exposed_at(candidate: Candidate, salt: bytes, plan: RolloutPlan, stage_index: int) -> bool:
    """Whether the plan exposes this candidate by stage `stage_index` (cumulative)."""
    cohort = plan.cohort
    if cohort is not None and cohort.contains(candidate.device.device_id, candidate.labels):
        return True
    stage: Stage = plan.stages[stage_index]
    return stage.ppm > 0 and is_exposed(salt, candidate.device.device_id, stage.ppm)


def eligible_devices(session: Session, rollout: RolloutRow, bundle: BundleRow) -> list[DeviceRow]:
    """Devices the selector matches and the bundle was signed for (model, minimum firmware)."""
    devices = fleet.select_devices(session, Selector.parse(rollout.selector))
    return [d for d in devices if compatible(d, bundle)]


def eligible_count(session: Session, rollout: RolloutRow, bundle: BundleRow) -> int:
    """`len(eligible_devices(...))`, counted in SQL per distinct device attributes.

    Reports, GetRollout and WatchRollout need only the number: this costs one
    aggregate query over the device table plus a test per attribute group, not
    one ORM object and one selector test per device.
    """
    selector = Selector.parse(rollout.selector)
    models = json.loads(bundle.models_json)
    return sum(
        g.devices
        for g in fleet.attribute_groups(session, selector, models=models)
        if selector.matches(g.attributes) and compatible(g.attributes, bundle)
    )


def reported_eligible(session: Session, rollout: RolloutRow, bundle: BundleRow) -> int:
    """The eligible count a report shows, without counting the fleet when it can.

    A running rollout's count is maintained by the engine on every tick
    (`expose_current_stage`); a paused or finished one keeps the last count.
    A draft, or a rollout the engine has not counted yet, is counted now.
    """
    if rollout.state == DRAFT or rollout.eligible is None:
        return eligible_count(session, rollout, bundle)
    return rollout.eligible


def expose_current_stage(
    session: Session,
    rollout: RolloutRow,
    bundle: BundleRow,
    plan: RolloutPlan,
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
) -> int:
    """Expose every candidate the current stage covers and that is not exposed yet.

    Idempotent: run on every engine tick, it picks up devices registered after
    the start, and after a crash it finishes an exposure that was cut short.
    """
    salt = bytes.fromhex(rollout.salt_hex)
    already = rollouts.exposed_device_ids(session, rollout.rollout_id)
    candidates, excluded = classify(
        fleet.select_devices(session, Selector.parse(rollout.selector)), rollout, bundle, plan
    )
    eligible = len(candidates) + len(excluded[HOLDOUT])  # == eligible_count(...)
    if rollout.eligible != eligible:
        rollouts.set_quietly(session, rollout, eligible=eligible)
    new = [
        c.device
        for c in candidates
        if c.device.device_id not in already and exposed_at(c, salt, plan, rollout.current_stage)
    ]
    if not new:
        return 0
    ids = [d.device_id for d in new]
    rollouts.expose(session, rollout.rollout_id, new, rollout.current_stage, now)
    desired.assign(session, ids, bundle, rollout.rollout_id)
    issue_desired_states(session, ids, signer, now=now, ttl=ttl)
    return len(ids)


def revert_exposed(
    session: Session,
    rollout: RolloutRow,
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
) -> int:
    """Send every device this rollout exposed back to its last-known-good bundle."""
    ids = sorted(rollouts.exposed_device_ids(session, rollout.rollout_id))
    if not ids:
        return 0
    desired.revert(session, ids, rollout.feature, rollout.rollout_id)
    return issue_desired_states(session, ids, signer, now=now, ttl=ttl)


def deactivate_exposed(
    session: Session,
    rollout: RolloutRow,
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
) -> int:
    """The kill switch: the feature off on every device this rollout exposed, at once."""
    ids = sorted(rollouts.exposed_device_ids(session, rollout.rollout_id))
    if not ids:
        return 0
    desired.deactivate(session, ids, rollout.feature, rollout.rollout_id)
    return issue_desired_states(session, ids, signer, now=now, ttl=ttl)
