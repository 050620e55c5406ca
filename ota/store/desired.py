"""Per-device feature assignments and the signed desired-state outbox.

A desired state is committed here before it is published; the publisher
sends what is not yet acknowledged by the broker, so a crash between commit
and publish only delays a notification, never loses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import update
from sqlmodel import Session, col, select

from ota.store.models import BundleRow, DesiredStateRow, DeviceFeatureRow, DeviceRow


def assign(session: Session, device_ids: Sequence[str], bundle: BundleRow, rollout_id: str) -> None:
    """Point each device's feature at `bundle`, remembering what it replaces."""
    current = features_of(session, device_ids, bundle.feature)
    for device_id in device_ids:
        row = current.get(device_id)
        if row is None:
            row = DeviceFeatureRow(
                device_id=device_id,
                feature=bundle.feature,
                version="",
                target_path="",
                sha256="",
                length=0,
                rollout_id=rollout_id,
            )
        elif row.rollout_id != rollout_id and row.active and not row.revert:
            row.prior_version, row.prior_target_path = row.version, row.target_path
            row.prior_sha256, row.prior_length = row.sha256, row.length
        row.version, row.target_path = bundle.version, bundle.target_path
        row.sha256, row.length = bundle.sha256, bundle.length
        row.active, row.revert, row.rollout_id = True, False, rollout_id
        session.add(row)


def revert(session: Session, device_ids: Sequence[str], feature: str, rollout_id: str) -> None:
    """Send each device back to the bundle it had before `rollout_id`."""
    for row in features_of(session, device_ids, feature).values():
        if row.rollout_id != rollout_id:
            continue
        if row.prior_target_path:
            row.version, row.target_path = row.prior_version or "", row.prior_target_path
            row.sha256, row.length = row.prior_sha256 or "", row.prior_length or 0
            row.active = True
        else:
            row.active = False
        row.revert = True
        session.add(row)


def deactivate(session: Session, device_ids: Sequence[str], feature: str, rollout_id: str) -> int:
    """Switch `feature` off on each device whose assignment `rollout_id` still owns."""
    count = 0
    for row in features_of(session, device_ids, feature).values():
        if row.rollout_id != rollout_id or (not row.active and not row.revert):
            continue
        row.active, row.revert = False, False
        session.add(row)
        count += 1
    return count


def features_of(
    session: Session, device_ids: Sequence[str], feature: str
) -> dict[str, DeviceFeatureRow]:
    query = (
        select(DeviceFeatureRow)
        .where(col(DeviceFeatureRow.device_id).in_(device_ids))
        .where(DeviceFeatureRow.feature == feature)
    )
    return {row.device_id: row for row in session.exec(query)}


def all_features(session: Session, device_ids: Sequence[str]) -> dict[str, list[DeviceFeatureRow]]:
    out: dict[str, list[DeviceFeatureRow]] = defaultdict(list)
    query = select(DeviceFeatureRow).where(col(DeviceFeatureRow.device_id).in_(device_ids))
    for row in session.exec(query.order_by(col(DeviceFeatureRow.feature))):
        out[row.device_id].append(row)
    return out


def next_generations(session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    """Increment and return each device's desired-state generation."""
    out: dict[str, int] = {}
    rows = session.exec(select(DeviceRow).where(col(DeviceRow.device_id).in_(device_ids)))
    for row in rows:
        row.generation += 1
        out[row.device_id] = row.generation
        session.add(row)
    return out


def save_envelopes(
    session: Session, envelopes: dict[str, tuple[int, bytes]], issued_at: datetime
) -> None:
    existing = {
        row.device_id: row
        for row in session.exec(
            select(DesiredStateRow).where(col(DesiredStateRow.device_id).in_(list(envelopes)))
        )
    }
    for device_id, (generation, envelope) in envelopes.items():
        row = existing.get(device_id) or DesiredStateRow(
            device_id=device_id, generation=0, envelope=b"", issued_at=issued_at
        )
        row.generation, row.envelope, row.issued_at = generation, envelope, issued_at
        session.add(row)


def issued_before(session: Session, when: datetime, limit: int) -> list[str]:
    """Devices whose desired state was signed before `when` (to renew before it expires)."""
    query = (
        select(DesiredStateRow.device_id)
        .where(col(DesiredStateRow.issued_at) < when)
        .order_by(col(DesiredStateRow.issued_at))
        .limit(limit)
    )
    return list(session.exec(query))


def get_envelope(session: Session, device_id: str) -> bytes | None:
    row = session.get(DesiredStateRow, device_id)
    return row.envelope if row else None


def unpublished(session: Session, limit: int) -> list[DesiredStateRow]:
    query = (
        select(DesiredStateRow)
        .where(col(DesiredStateRow.published_generation) < col(DesiredStateRow.generation))
        .limit(limit)
    )
    return list(session.exec(query))


def mark_published(session: Session, published: Sequence[tuple[str, int]]) -> None:
    for device_id, generation in published:
        # Only if no newer generation was issued meanwhile; that one must still go out.
        session.execute(
            update(DesiredStateRow)
            .where(col(DesiredStateRow.device_id) == device_id)
            .where(col(DesiredStateRow.published_generation) < generation)
            .values(published_generation=generation)
        )
