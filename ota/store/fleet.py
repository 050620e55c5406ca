"""Devices: registration, listing by selector, revocation."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Table,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    or_,
    update,
)
from sqlalchemy import select as core_select
from sqlalchemy.dialects import postgresql
from sqlmodel import Session, col, select

from ota.broker.passwords import check_username
from ota.clock import utc
from ota.domain.compatibility import Compatibility
from ota.domain.selector import DeviceAttributes, Selector, Term
from ota.errors import NotFound, Unauthenticated
from ota.store.models import DeviceRow, RevokedCertificateRow, RolloutDeviceRow


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


PASSWORD, CERTIFICATE = "password", "certificate"
# A factory or workshop may enroll days after registering a batch.
ENROLLMENT_TOKEN_LIFETIME = timedelta(days=7)


def register_devices(
    session: Session,
    registrations: Sequence[Registration],
    now: datetime,
    *,
    identity: str = PASSWORD,
) -> dict[str, str]:
    """Create or re-provision devices; returns a fresh secret (or enrollment token) for each.

    A certificate device gets no password: its secret digest is empty, which
    matches no secret, and it is told apart by the one-time token it enrolls
    with. Re-provisioning forgets the device's certificate.
    """
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
        if row.cert_serial:
            _retire_certificate(session, row, now, reason="superseded")
        row.identity = identity
        if identity == CERTIFICATE:
            row.secret_sha256 = ""
            row.enroll_token_sha256 = hash_secret(secret)
            row.enroll_expires_at = now + ENROLLMENT_TOKEN_LIFETIME
        else:
            row.secret_sha256 = hash_secret(secret)
            row.enroll_token_sha256 = ""
            row.enroll_expires_at = None
        row.revoked = False
        session.add(row)
    return issued


def take_enrollment_token(session: Session, device_id: str, token: str, now: datetime) -> DeviceRow:
    """The device whose one-time token this is; the token is spent.

    Every refusal reads the same, so the answer tells a caller nothing about
    which devices exist or have enrolled.
    """
    refused = Unauthenticated("the enrollment token is not valid for this device")
    row = session.get(DeviceRow, device_id)
    if row is None or row.revoked or not row.enroll_token_sha256:
        raise refused
    if not secrets.compare_digest(row.enroll_token_sha256, hash_secret(token)):
        raise refused
    if row.enroll_expires_at is None or utc(row.enroll_expires_at) <= now:
        raise refused
    row.enroll_token_sha256 = ""
    row.enroll_expires_at = None
    return row


def record_certificate(
    session: Session, row: DeviceRow, serial: str, not_after: datetime, now: datetime
) -> None:
    """Make `serial` the device's one certificate; the one before it is refused from now on."""
    if row.cert_serial:
        _retire_certificate(session, row, now, reason="superseded")
    row.identity = CERTIFICATE
    row.secret_sha256 = ""
    row.cert_serial = serial
    row.cert_not_after = not_after
    session.add(row)


def _retire_certificate(session: Session, row: DeviceRow, now: datetime, *, reason: str) -> None:
    if session.get(RevokedCertificateRow, row.cert_serial) is None:
        session.add(
            RevokedCertificateRow(
                serial=row.cert_serial,
                device_id=row.device_id,
                revoked_at=now,
                not_after=row.cert_not_after or now,
                reason=reason,
            )
        )
    row.cert_serial = ""
    row.cert_not_after = None


def revoked_serials(
    session: Session, now: datetime, *, superseded: bool = True
) -> list[tuple[str, datetime]]:
    """Certificates refused before their expiry, for the CRL: (serial, revoked at).

    `superseded=False` leaves out those a renewal replaced (gRPC refuses them
    anyway), which keeps a large fleet's CRL to its revoked devices.
    """
    query = select(RevokedCertificateRow).where(col(RevokedCertificateRow.not_after) > now)
    if not superseded:
        query = query.where(col(RevokedCertificateRow.reason) == "revoked")
    rows = session.exec(query.order_by(col(RevokedCertificateRow.serial)))
    return [(r.serial, utc(r.revoked_at)) for r in rows]


def revoked_with_live_certificates(session: Session, now: datetime) -> list[str]:
    """Revoked devices whose last certificate has not expired: the broker must keep refusing them."""
    query = (
        core_select(_REVOKED_CERT.c.device_id)
        .where(_REVOKED_CERT.c.reason == "revoked", _REVOKED_CERT.c.not_after > now)
        .distinct()
        .order_by(_REVOKED_CERT.c.device_id)
    )
    return list(session.execute(query).scalars())


def get_device(session: Session, device_id: str) -> DeviceRow:
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise NotFound(f"device {device_id!r} does not exist", field="device_id")
    return row


def attributes(row: DeviceRow) -> DeviceAttributes:
    labels: dict[str, str] = json.loads(row.labels_json)
    return DeviceAttributes(row.device_id, row.model, row.region, row.firmware, labels)


_DEVICE: Table = DeviceRow.__table__  # type: ignore[attr-defined]
_ROLLOUT_DEVICE: Table = RolloutDeviceRow.__table__  # type: ignore[attr-defined]
_REVOKED_CERT: Table = RevokedCertificateRow.__table__  # type: ignore[attr-defined]


class DeviceInfo(NamedTuple):
    """What exposure needs of a device, read as a Core row (no ORM object)."""

    device_id: str
    model: str
    region: str
    firmware: str
    labels_json: str

    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = json.loads(self.labels_json)
        return labels


@dataclass(frozen=True)
class Eligibility:
    """Which devices a rollout may reach: its selector and what its bundle was signed for."""

    selector: Selector
    compatibility: Compatibility = field(default_factory=Compatibility)

    @property
    def judges_firmware(self) -> bool:
        return bool(self.compatibility.min_firmware) or any(
            t.attr == "firmware" for t in self.selector.terms
        )

    def admits_firmware(self, firmware: str) -> bool:
        """The firmware terms of the selector and the bundle's floor, for one firmware string."""
        if not self.compatibility.admits_firmware(firmware):
            return False
        probe = DeviceAttributes("", "", "", firmware)
        return all(t.matches(probe) for t in self.selector.terms if t.attr == "firmware")


def eligible_where(
    session: Session,
    eligibility: Eligibility,
    *,
    judge_firmware: bool = True,
    include_revoked: bool = False,
) -> list[ColumnElement[bool]]:
    """SQL conditions that hold exactly for the non-revoked devices eligibility admits.

    `include_revoked` drops the one condition a rollout needs and a listing may
    not: the revoked devices the selector matches are kept.

    Equivalent to `selector.matches` (the reference, property-tested against this)
    plus the bundle's model and firmware floor. Text terms become SQL comparisons;
    labels are read from the JSON column. Firmware compares as a version, which
    SQL cannot do, so the few distinct firmware strings of the fleet are judged
    in Python and the survivors become one `firmware IN (...)`.
    """
    conditions: list[ColumnElement[bool]] = (
        [] if include_revoked else [_DEVICE.c.revoked.is_(False)]
    )
    for term in eligibility.selector.terms:
        if term.attr != "firmware":
            conditions.append(_text_condition(session, term))
    # `Compatibility` in SQL: the model list as IN, the firmware floor judged per
    # distinct firmware string by `Compatibility.admits_firmware` below.
    if eligibility.compatibility.models:
        conditions.append(_DEVICE.c.model.in_(sorted(eligibility.compatibility.models)))
    if judge_firmware and eligibility.judges_firmware:
        admitted = _firmware_admitted(session, eligibility, include_revoked=include_revoked)
        conditions.append(_DEVICE.c.firmware.in_(admitted))
    return conditions


def _text_condition(session: Session, term: Term) -> ColumnElement[bool]:
    if term.attr.startswith("labels."):
        value = _label(session, term.attr.removeprefix("labels."))
        # A missing label matches only the negative operators, as in `Term.matches`.
        if term.op in ("=", "in"):
            return value.in_(term.values)
        return or_(value.is_(None), value.not_in(term.values))
    column = _DEVICE.c[term.attr]
    if term.op in ("=", "in"):
        return column.in_(term.values)
    return column.not_in(term.values)


def _label(session: Session, name: str) -> ColumnElement[Any]:
    if session.get_bind().dialect.name == "postgresql":
        text: ColumnElement[Any] = cast(_DEVICE.c.labels_json, postgresql.JSONB)[name].astext
        return text
    # Label names are selector words ([A-Za-z0-9_.-:/+]), so quoting them in the path is safe.
    return func.json_extract(_DEVICE.c.labels_json, f'$."{name}"')


def _firmware_admitted(
    session: Session, eligibility: Eligibility, *, include_revoked: bool = False
) -> list[str]:
    query = core_select(_DEVICE.c.firmware).distinct()
    if not include_revoked:
        query = query.where(_DEVICE.c.revoked.is_(False))
    distinct = session.execute(query).scalars()
    return sorted(firmware for firmware in distinct if eligibility.admits_firmware(firmware))


def count_eligible(session: Session, eligibility: Eligibility) -> int:
    """How many devices eligibility admits: one query in SQL, no device loaded.

    When firmware must be judged, the count is grouped by firmware and the
    admitted groups summed, instead of first listing the distinct firmware.
    """
    if not eligibility.judges_firmware:
        query = (
            core_select(func.count())
            .select_from(_DEVICE)
            .where(*eligible_where(session, eligibility))
        )
        return int(session.execute(query).scalar_one())
    grouped = (
        core_select(_DEVICE.c.firmware, func.count())
        .where(*eligible_where(session, eligibility, judge_firmware=False))
        .group_by(_DEVICE.c.firmware)
    )
    return sum(
        int(n) for firmware, n in session.execute(grouped) if eligibility.admits_firmware(firmware)
    )


def unexposed_devices(
    session: Session, eligibility: Eligibility, rollout_id: str
) -> list[DeviceInfo]:
    """Admitted devices that `rollout_id` has not exposed yet, as Core rows in id order.

    An anti-join on `rollout_device`: once a stage is exposed, its devices cost
    the engine nothing on later ticks.
    """
    exposed = (
        core_select(literal(1))
        .where(_ROLLOUT_DEVICE.c.rollout_id == rollout_id)
        .where(_ROLLOUT_DEVICE.c.device_id == _DEVICE.c.device_id)
    )
    query = (
        core_select(*(_DEVICE.c[name] for name in DeviceInfo._fields))
        .where(*eligible_where(session, eligibility))
        .where(~exists(exposed))
        .order_by(_DEVICE.c.device_id)
    )
    return [DeviceInfo._make(row) for row in session.execute(query)]


def select_devices(session: Session, selector: Selector) -> list[DeviceRow]:
    """Every device not revoked that the selector matches, in id order."""
    query = (
        select(DeviceRow)
        .where(*eligible_where(session, Eligibility(selector)))
        .order_by(col(DeviceRow.device_id))
    )
    return list(session.exec(query))


def list_devices(
    session: Session,
    selector: Selector,
    *,
    after: str,
    limit: int,
    include_revoked: bool = False,
) -> tuple[list[DeviceRow], int]:
    """A page of matching devices after id `after`, and the total match count.

    Revoked devices only with `include_revoked`: by default the list is the
    fleet a rollout could reach.
    """
    conditions = eligible_where(session, Eligibility(selector), include_revoked=include_revoked)
    page = session.exec(
        select(DeviceRow)
        .where(*conditions)
        .where(col(DeviceRow.device_id) > after)
        .order_by(col(DeviceRow.device_id))
        .limit(limit)
    )
    total = session.execute(core_select(func.count()).select_from(_DEVICE).where(*conditions))
    return list(page), int(total.scalar_one())


def revoke(session: Session, device_id: str, now: datetime | None = None) -> DeviceRow:
    now = now or datetime.now(UTC)
    row = get_device(session, device_id)
    row.revoked = True
    # The broker drops its connection and refuses its identity, so the offline
    # presence (its will) that would otherwise say so never arrives.
    row.online = False
    row.enroll_token_sha256 = ""
    row.enroll_expires_at = None
    if row.cert_serial:
        serial, not_after = row.cert_serial, row.cert_not_after
        _retire_certificate(session, row, now, reason="revoked")
        # Still shown by GetDevice: which certificate was refused.
        row.cert_serial, row.cert_not_after = serial, not_after
    session.add(row)
    return row


def check_device_id(device_id: str, *, field: str = "device_id") -> str:
    """A device id is its broker username and a topic level, so it obeys both rules."""
    return check_username(device_id, field=field)


def valid_secret_digests(session: Session, device_ids: Collection[str]) -> dict[str, str]:
    """The secret digest of each of `device_ids` that exists and is not revoked.

    One query for many devices: credential checks arriving together share it.
    """
    query = core_select(_DEVICE.c.device_id, _DEVICE.c.secret_sha256).where(
        _DEVICE.c.device_id.in_(sorted(device_ids)), _DEVICE.c.revoked.is_(False)
    )
    return {device_id: digest for device_id, digest in session.execute(query).all()}


def valid_certificates(session: Session, device_ids: Collection[str]) -> dict[str, str]:
    """The current certificate serial of each of `device_ids` that exists and is not revoked."""
    query = core_select(_DEVICE.c.device_id, _DEVICE.c.cert_serial).where(
        _DEVICE.c.device_id.in_(sorted(device_ids)),
        _DEVICE.c.revoked.is_(False),
        _DEVICE.c.cert_serial != "",
    )
    return {device_id: serial for device_id, serial in session.execute(query).all()}


def mark_seen(session: Session, seen: Iterable[tuple[str, datetime, bool | None]]) -> None:
    """Record presence: when each device was last heard of and, if it said, whether online.

    Runs on the ingest path for every presence message: one executemany per
    kind of update, not a SELECT and an ORM object per message. Within a batch
    the last report of a device wins, as if applied one by one.
    """
    last_seen: dict[str, datetime] = {}
    online: dict[str, bool] = {}
    for device_id, when, state in seen:
        last_seen[device_id] = when
        if state is not None:
            online[device_id] = state
    with_online = [
        {"s_device_id": d, "s_last_seen_at": w, "s_online": online[d]}
        for d, w in last_seen.items()
        if d in online
    ]
    without = [
        {"s_device_id": d, "s_last_seen_at": w} for d, w in last_seen.items() if d not in online
    ]
    if with_online:
        session.execute(_SEEN_ONLINE, with_online)
    if without:
        session.execute(_SEEN, without)


_SEEN = (
    update(_DEVICE)
    .where(_DEVICE.c.device_id == bindparam("s_device_id"))
    .values(last_seen_at=bindparam("s_last_seen_at"))
)
# A revoked device is offline whatever it last said: a report that was in
# flight when it was revoked must not bring it back online.
_SEEN_ONLINE = _SEEN.values(
    online=case((_DEVICE.c.revoked.is_(True), False), else_=bindparam("s_online"))
)
