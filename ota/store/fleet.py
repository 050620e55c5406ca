"""Devices: registration, listing by selector, revocation."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Table, func
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from ota.broker.passwords import check_username
from ota.domain.selector import DeviceAttributes, Selector
from ota.errors import NotFound
from ota.store.models import DeviceRow


@dataclass(frozen=True)
class Registration:
    device_id: str
    model: str
    region: str
    firmware: str
    labels: dict[str, str]


def hash_secret(secret: str) -> str:
    # Secrets are 256-bit random, so a plain digest is enough (no PBKDF2 needed).
    return hashlib.sha256(secret.encode()).hexdigest()


def register_devices(
    session: Session, registrations: Sequence[Registration], now: datetime
) -> dict[str, str]:
    """Create or re-provision devices; returns a fresh secret for each."""
    ids = [r.device_id for r in registrations]
    existing = {
        row.device_id: row
        for row in session.exec(select(DeviceRow).where(col(DeviceRow.device_id).in_(ids)))
    }
    issued: dict[str, str] = {}
    for reg in registrations:
        secret = secrets.token_hex(24)  # 192 bits; hex never starts with "-" on a command line
        issued[reg.device_id] = secret
        row = existing.get(reg.device_id)
        if row is None:
            row = DeviceRow(
                device_id=reg.device_id,
                model=reg.model,
                region=reg.region,
                firmware=reg.firmware,
                secret_sha256="",
                created_at=now,
            )
        row.model, row.region, row.firmware = reg.model, reg.region, reg.firmware
        row.labels_json = json.dumps(reg.labels, sort_keys=True)
        row.secret_sha256 = hash_secret(secret)
        row.revoked = False
        session.add(row)
    return issued


def get_device(session: Session, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise NotFound(f"device {device_id!r} does not exist", field="device_id")
    return row


def attributes(row: DeviceRow) -> DeviceAttributes:
    labels: dict[str, str] = json.loads(row.labels_json)
    return DeviceAttributes(row.device_id, row.model, row.region, row.firmware, labels)


_DEVICE: Table = DeviceRow.__table__  # type: ignore[attr-defined]
# Selector attributes compared as plain strings, so SQL can apply their terms as is
# (firmware compares as a version and labels live in JSON: those stay in Python).
_PLAIN = ("model", "region", "device_id")


def _prefilter(selector: Selector, models: Collection[str] = ()) -> list[ColumnElement[bool]]:
    """SQL conditions every non-revoked device the selector matches satisfies.

    Only a narrowing: callers still test `selector.matches` on what comes back.
    `models`, when not empty, also restricts the device model to that set.
    """
    conditions: list[ColumnElement[bool]] = [_DEVICE.c.revoked.is_(False)]
    for term in selector.terms:
        if term.attr not in _PLAIN:
            continue
        column = _DEVICE.c[term.attr]
        if term.op in ("=", "in"):
            conditions.append(column.in_(term.values))
        elif term.op in ("!=", "not in"):
            conditions.append(column.not_in(term.values))
    if models:
        conditions.append(_DEVICE.c.model.in_(sorted(models)))
    return conditions


def select_devices(session: Session, selector: Selector) -> list[DeviceRow]:
    """Every device not revoked that the selector matches, in id order."""
    rows = session.exec(
        select(DeviceRow).where(*_prefilter(selector)).order_by(col(DeviceRow.device_id))
    )
    return [row for row in rows if selector.matches(attributes(row))]


@dataclass(frozen=True)
class AttributeGroup:
    """Devices sharing every attribute a selector or bundle can test (but their ids)."""

    attributes: DeviceAttributes  # device_id is "" unless the selector tests it
    devices: int


def attribute_groups(
    session: Session, selector: Selector, *, models: Collection[str] = ()
) -> list[AttributeGroup]:
    """Non-revoked devices the selector may match, counted per distinct attributes.

    A fleet has few distinct (model, region, firmware, labels), so this is one
    aggregate query and a handful of selector tests instead of one per device.
    When the selector tests device ids, each device is its own group.
    """
    by_id = any(term.attr == "device_id" for term in selector.terms)
    keys: list[Any] = [_DEVICE.c.model, _DEVICE.c.region, _DEVICE.c.firmware, _DEVICE.c.labels_json]
    if by_id:
        keys.append(_DEVICE.c.device_id)
    query = core_select(*keys, func.count()).where(*_prefilter(selector, models)).group_by(*keys)
    groups: list[AttributeGroup] = []
    for row in session.execute(query):
        labels: dict[str, str] = json.loads(row[3])
        device_id = row[4] if by_id else ""
        groups.append(
            AttributeGroup(
                DeviceAttributes(device_id, row[0], row[1], row[2], labels), int(row[-1])
            )
        )
    return groups


def list_devices(
    session: Session, selector: Selector, *, after: str, limit: int
) -> tuple[list[DeviceRow], int]:
    """A page of matching devices after id `after`, and the total match count."""
    matching = select_devices(session, selector)
    page = [row for row in matching if row.device_id > after][:limit]
    return page, len(matching)


def revoke(session: Session, device_id: str) -> DeviceRow:
    row = get_device(session, device_id)
    row.revoked = True
    session.add(row)
    return row


def check_device_id(device_id: str, *, field: str = "device_id") -> str:
    """A device id is its broker username and a topic level, so it obeys both rules."""
    return check_username(device_id, field=field)


def authenticate(session: Session, device_id: str, secret: str) -> bool:
    row = session.get(DeviceRow, device_id)
    return (
        row is not None
        and not row.revoked
        and secrets.compare_digest(row.secret_sha256, hash_secret(secret))
    )


def mark_seen(session: Session, seen: Iterable[tuple[str, datetime, bool | None]]) -> None:
    for device_id, when, online in seen:
        row = session.get(DeviceRow, device_id)
        if row is None:
            continue
        row.last_seen_at = when
        if online is not None:
            row.online = online
        session.add(row)
