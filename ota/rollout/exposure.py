"""Who a rollout exposes: eligible devices whose bucket falls under the stage's ppm."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from sqlmodel import Session

from ota.domain.bucketing import is_exposed
from ota.domain.selector import Selector
from ota.domain.version import Version
from ota.errors import InvalidArgument
from ota.rollout.notify import DesiredStateSigner, issue_desired_states
from ota.store import desired, fleet, rollouts
from ota.store.models import BundleRow, DeviceRow, RolloutRow


def eligible_devices(session: Session, rollout: RolloutRow, bundle: BundleRow) -> list[DeviceRow]:
    """Devices the selector matches and the bundle was signed for (model, minimum firmware)."""
    models = set(json.loads(bundle.models_json))
    floor = Version.parse(bundle.min_firmware) if bundle.min_firmware else None
    devices = fleet.select_devices(session, Selector.parse(rollout.selector))
    return [
        d
        for d in devices
        if (not models or d.model in models) and (floor is None or _firmware_at_least(d, floor))
    ]


def _firmware_at_least(device: DeviceRow, floor: Version) -> bool:
    try:
        return Version.parse(device.firmware) >= floor
    except InvalidArgument:
        return False


def expose_current_stage(
    session: Session,
    rollout: RolloutRow,
    bundle: BundleRow,
    ppm: int,
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
) -> int:
    """Expose every eligible device the stage covers and that is not exposed yet.

    Idempotent: run on every engine tick, it picks up devices registered after
    the start, and after a crash it finishes an exposure that was cut short.
    """
    salt = bytes.fromhex(rollout.salt_hex)
    already = rollouts.exposed_device_ids(session, rollout.rollout_id)
    new = [
        d
        for d in eligible_devices(session, rollout, bundle)
        if d.device_id not in already and is_exposed(salt, d.device_id, ppm)
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
