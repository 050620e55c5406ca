"""Per-device feature assignments and the signed desired-state outbox.

A desired state is committed here before it is published; the publisher
sends what is not yet acknowledged by the broker, so a crash between commit
and publish only delays a notification, never loses it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Insert, Row, Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from ota.store.models import BundleRow, DesiredStateRow, DeviceFeatureRow, DeviceRow
from ota.store.upsert import replacing_insert


def assign(session: Session, device_ids: Sequence[str], bundle: BundleRow, rollout_id: str) -> None:
    """Point each device's feature at `bundle`, remembering what it replaces.

    One read and one upsert for the whole batch (Core, not an ORM object per device):
    exposure of a stage assigns thousands of devices at once.
    """
    current = {
        row["device_id"]: row
        for row in session.execute(
            _FEATURES.select()
            .where(_FEATURES.c.device_id.in_(device_ids))
            .where(_FEATURES.c.feature == bundle.feature)
        ).mappings()
    }
    rows: list[dict[str, Any]] = []
    for device_id in device_ids:
        before = current.get(device_id)
        prior: dict[str, Any] = {
            name: before[name] if before is not None else None for name in _PRIOR_COLUMNS
        }
        if (
            before is not None
            and before["rollout_id"] != rollout_id
            and before["active"]
            and not before["revert"]
        ):
            prior = {
                "prior_version": before["version"],
                "prior_target_path": before["target_path"],
                "prior_sha256": before["sha256"],
                "prior_length": before["length"],
            }
        rows.append(
            {
                "device_id": device_id,
                "feature": bundle.feature,
                "version": bundle.version,
                "target_path": bundle.target_path,
                "sha256": bundle.sha256,
                "length": bundle.length,
                "active": True,
                "revert": False,
                "rollout_id": rollout_id,
                **prior,
            }
        )
    if rows:
        session.execute(replacing_insert(session, _FEATURES, ["device_id", "feature"]), rows)


_FEATURES: Table = DeviceFeatureRow.__table__  # type: ignore[attr-defined]
_DESIRED: Table = DesiredStateRow.__table__  # type: ignore[attr-defined]
_DEVICES: Table = DeviceRow.__table__  # type: ignore[attr-defined]
_PRIOR_COLUMNS = ("prior_version", "prior_target_path", "prior_sha256", "prior_length")


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


def all_features(session: Session, device_ids: Sequence[str]) -> dict[str, list[Row[Any]]]:
    """Every feature assignment of each device, by feature name, as Core rows."""
    out: dict[str, list[Row[Any]]] = defaultdict(list)
    query = (
        _FEATURES.select()
        .where(_FEATURES.c.device_id.in_(device_ids))
        .order_by(_FEATURES.c.device_id, _FEATURES.c.feature)
    )
    for row in session.execute(query):
        out[row.device_id].append(row)
    return out


def next_generations(session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    """Increment and return each device's desired-state generation (one UPDATE ... RETURNING)."""
    if not device_ids:
        return {}
    bumped = session.execute(
        update(_DEVICES)
        .where(_DEVICES.c.device_id.in_(device_ids))
        .values(generation=_DEVICES.c.generation + 1)
        .returning(_DEVICES.c.device_id, _DEVICES.c.generation)
    )
    return {device_id: int(generation) for device_id, generation in bumped}


def save_envelopes(
    session: Session, envelopes: dict[str, tuple[int, bytes]], issued_at: datetime
) -> None:
    """Store each device's newly signed envelope (one upsert; the published mark is kept)."""
    if not envelopes:
        return
    rows = [
        {
            "device_id": device_id,
            "generation": generation,
            "envelope": envelope,
            "issued_at": issued_at,
            "published_generation": 0,
        }
        for device_id, (generation, envelope) in envelopes.items()
    ]
    columns = ("generation", "envelope", "issued_at")
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(_DESIRED)
        statement: Insert = pg.on_conflict_do_update(
            index_elements=["device_id"], set_={c: pg.excluded[c] for c in columns}
        )
    else:
        lite = sqlite.insert(_DESIRED)
        statement = lite.on_conflict_do_update(
            index_elements=["device_id"], set_={c: lite.excluded[c] for c in columns}
        )
    session.execute(statement, rows)


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


def unpublished(session: Session, limit: int, *, after: str = "") -> list[Row[Any]]:
    """Up to `limit` states not yet acknowledged, in device-id order from just past `after`.

    The order lets one pass walk the whole outbox a batch at a time while the
    batches before are still being acknowledged, reading each device once.
    Core rows of the three columns sent, not ORM objects: a stage reads
    thousands, and building the objects cost more than sending them.
    """
    query = (
        select(_DESIRED.c.device_id, _DESIRED.c.generation, _DESIRED.c.envelope)
        .where(_DESIRED.c.published_generation < _DESIRED.c.generation)
        .where(_DESIRED.c.device_id > after)
        .order_by(_DESIRED.c.device_id)
        .limit(limit)
    )
    return list(session.execute(query))


def mark_published(session: Session, published: Sequence[tuple[str, int]]) -> None:
    """Record what the broker acknowledged (one executemany)."""
    if not published:
        return
    # Only if no newer generation was issued meanwhile; that one must still go out.
    session.execute(
        update(_DESIRED)
        .where(_DESIRED.c.device_id == bindparam("d_device_id"))
        .where(_DESIRED.c.published_generation < bindparam("d_generation"))
        .values(published_generation=bindparam("d_generation")),
        [{"d_device_id": d, "d_generation": g} for d, g in published],
    )
