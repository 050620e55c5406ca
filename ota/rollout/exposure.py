"""Who a rollout exposes: eligible devices, outside the holdout, under the stage.

One classification serves the engine (who to expose now) and the dry run (who
each stage would expose, who is left out and why), so the two never disagree.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session

from ota.domain.bucketing import is_control, is_exposed
from ota.domain.plan import RolloutPlan, Stage
from ota.domain.selector import DeviceAttributes, Selector
from ota.domain.states import DRAFT
from ota.rollout.notify import DesiredStateSigner, issue_desired_states
from ota.store import bundles, desired, fleet, rollouts
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
    """Whether the bundle was signed for this device's model and firmware."""
    return bundles.compatibility(bundle).admits(device.model, device.firmware)


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
    return _covers(plan, salt, stage_index, candidate.device.device_id, lambda: candidate.labels)


def _covers(
    plan: RolloutPlan,
    salt: bytes,
    stage_index: int,
    device_id: str,
    labels: Callable[[], Mapping[str, str]],
) -> bool:
    cohort = plan.cohort
    if cohort is not None and cohort.contains(device_id, labels()):
        return True
    stage: Stage = plan.stages[stage_index]
    return stage.ppm > 0 and is_exposed(salt, device_id, stage.ppm)


def eligibility(rollout: RolloutRow, bundle: BundleRow) -> fleet.Eligibility:
    """The devices a rollout may reach: its selector, and the models and firmware its bundle serves."""
    return fleet.Eligibility(Selector.parse(rollout.selector), bundles.compatibility(bundle))


def eligible_count(session: Session, rollout: RolloutRow, bundle: BundleRow) -> int:
    """How many devices are eligible (the holdout included): one COUNT in SQL.

    Equal to the candidates plus the holdout of `classify` over the whole fleet,
    which stays the reference (tests compare the two).
    """
    return fleet.count_eligible(session, eligibility(rollout, bundle))


def reported_eligible(session: Session, rollout: RolloutRow, bundle: BundleRow) -> int:
    """The eligible count a report shows, without counting the fleet when it can.

    A running rollout's count is maintained by the engine on every tick
    (`expose_current_stage`); a paused or finished one keeps the last count.
    A draft, or a rollout the engine has not counted yet, is counted now.
    """
    if rollout.state == DRAFT or rollout.eligible is None:
        return eligible_count(session, rollout, bundle)
    return rollout.eligible


# rollout_id -> (eligible count it was made for, monotonic time, holdout devices, per label)
_HOLDOUT_COUNTS: dict[str, tuple[int, float, int, dict[str, int]]] = {}
_HOLDOUT_COUNT_SECONDS = 30.0


def holdout_count(session: Session, rollout: RolloutRow, bundle: BundleRow, eligible: int) -> int:
    """How many eligible devices are in the rollout's holdout (never exposed).

    Holdout devices are never exposed, so they are among the eligible devices the
    rollout has not exposed: those are read (an anti-join, as the engine does) and
    hashed. The count is kept per process for up to 30 s while the eligible count
    stays the same, so a live page does not hash the fleet on every update.
    """
    return _holdout(session, rollout, bundle, eligible)[0]


def holdout_by_label(
    session: Session, rollout: RolloutRow, bundle: BundleRow, eligible: int
) -> dict[str, int]:
    """Holdout devices per `key=value` label, from the same pass as `holdout_count`.

    Membership of the holdout is a hash of the device id, which SQL cannot
    compute, so the labels are counted on the rows that pass hashes anyway.
    """
    return _holdout(session, rollout, bundle, eligible)[1]


def _holdout(
    session: Session, rollout: RolloutRow, bundle: BundleRow, eligible: int
) -> tuple[int, dict[str, int]]:
    holdout_ppm = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json).holdout_ppm
    if not holdout_ppm:
        return 0, {}
    cached = _HOLDOUT_COUNTS.get(rollout.rollout_id)
    if (
        cached is not None
        and cached[0] == eligible
        and time.monotonic() - cached[1] < _HOLDOUT_COUNT_SECONDS
    ):
        return cached[2], cached[3]
    salt = bytes.fromhex(rollout.salt_hex)
    count = 0
    labels: Counter[str] = Counter()
    for row in fleet.unexposed_devices(session, eligibility(rollout, bundle), rollout.rollout_id):
        if is_control(salt, row.device_id, holdout_ppm):
            count += 1
            labels.update(f"{k}={v}" for k, v in row.labels().items())
    _HOLDOUT_COUNTS[rollout.rollout_id] = (eligible, time.monotonic(), count, dict(labels))
    return count, dict(labels)


class QuietRollouts:
    """Rollouts whose last full pass found nobody new to expose, to skip re-reading them.

    A stage that is fully exposed would otherwise re-read every device it does
    not cover on every tick (4 per second). The pass is repeated when the stage
    or the eligible count changes (a device registered or revoked), and at least
    every `rescan_seconds` anyway, which bounds how late a re-provisioned device
    whose attributes changed (same count) joins.
    """

    def __init__(self, rescan_seconds: float = 2.0) -> None:
        self._rescan = rescan_seconds
        self._quiet: dict[str, tuple[int, int, float]] = {}

    def may_skip(self, rollout_id: str, stage: int, eligible: int) -> bool:
        seen = self._quiet.get(rollout_id)
        if seen is None or seen[:2] != (stage, eligible):
            return False
        return time.monotonic() - seen[2] < self._rescan

    def record(self, rollout_id: str, stage: int, eligible: int, *, exposed: int) -> None:
        """After a full pass: quiet from now on if it exposed nobody."""
        if exposed:
            self._quiet.pop(rollout_id, None)
        else:
            self._quiet[rollout_id] = (stage, eligible, time.monotonic())


# Devices exposed (signed, written) per engine step. A bounded step keeps the
# write transaction short, so ingest is not locked out on SQLite while a large
# stage is signed, and the publisher starts sending the first batch sooner.
EXPOSE_BATCH = 2000


def expose_current_stage(
    session: Session,
    rollout: RolloutRow,
    bundle: BundleRow,
    plan: RolloutPlan,
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
    limit: int = EXPOSE_BATCH,
    quiet: QuietRollouts | None = None,
) -> int:
    """Expose up to `limit` candidates the current stage covers and that are not exposed yet.

    Idempotent: run on every engine tick, it picks up devices registered after
    the start, and after a crash it finishes an exposure that was cut short.
    Returning `limit` means more may be waiting; the caller comes back for them.
    Only devices not yet exposed are read (SQL does the selection), so a tick
    after a stage is exposed costs one count and an empty anti-join.
    """
    salt = bytes.fromhex(rollout.salt_hex)
    admitted = eligibility(rollout, bundle)
    eligible = fleet.count_eligible(session, admitted)
    if rollout.eligible != eligible:
        rollouts.set_quietly(session, rollout, eligible=eligible)
    stage_index = rollout.current_stage
    if quiet is not None and quiet.may_skip(rollout.rollout_id, stage_index, eligible):
        return 0
    holdout = plan.holdout_ppm
    new: list[fleet.DeviceInfo] = []
    for row in fleet.unexposed_devices(session, admitted, rollout.rollout_id):
        if holdout and is_control(salt, row.device_id, holdout):
            continue
        if _covers(plan, salt, rollout.current_stage, row.device_id, row.labels):
            new.append(row)
            if len(new) == limit:
                break
    if quiet is not None:
        quiet.record(rollout.rollout_id, stage_index, eligible, exposed=len(new))
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
