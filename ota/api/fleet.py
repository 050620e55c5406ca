"""FleetService: provisioning, listing, history and revocation of devices."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import grpc
from sqlmodel import Session, col, select

from ota.api import convert
from ota.api.auth import Authenticator, caller_of
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.device.enroll import RENEW_AFTER_FRACTION
from ota.domain.accounts import reserving_account
from ota.domain.selector import Selector
from ota.domain.version import Version
from ota.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from ota.store import audit, control_accounts, fleet
from ota.store.models import DeviceEventRow, DeviceRow
from ota.store.session import Store
from ota.trust.device_ca import DeviceCa, IssuedCertificate
from ota.v1 import fleet_pb2, fleet_pb2_grpc

MAX_REGISTRATIONS = 10_000


class BrokerAccounts(Protocol):
    """Where device broker credentials go (a Mosquitto password file, ...)."""

    def set_many(self, secrets: dict[str, str]) -> None: ...
    def remove(self, username: str) -> None: ...


class BrokerRevocations(Protocol):
    """Tells the broker to drop and refuse devices (and to forget that again)."""

    def revoked(self, device_ids: list[str]) -> None: ...
    def restored(self, device_ids: list[str]) -> None: ...


class FloodFlags(Protocol):
    """How many of a device's messages ingest dropped as over its rate, if it is flagged."""

    def dropped_if_flagged(self, device_id: str) -> int | None: ...


class FleetServicer(fleet_pb2_grpc.FleetServiceServicer):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        auth: Authenticator,
        *,
        accounts: BrokerAccounts | None,
        mqtt_url: str,
        topic_root: str,
        flood_guard: FloodFlags | None = None,
        device_ca: DeviceCa | None = None,
        revocations: BrokerRevocations | None = None,
        on_certificates_changed: Callable[[], None] | None = None,
        device_mqtt_url: str = "",
        crl_superseded: bool = True,
    ) -> None:
        self._crl_superseded = crl_superseded
        self._device_mqtt_url = device_mqtt_url or mqtt_url
        self._flood_guard = flood_guard
        self._device_ca = device_ca
        self._revocations = revocations
        self._certificates_changed = on_certificates_changed
        self._store = store
        self._clock = clock
        self._auth = auth
        self._accounts = accounts
        self._mqtt_url = mqtt_url
        self._topic_root = topic_root

    def RegisterDevices(
        self, request: fleet_pb2.RegisterDevicesRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.RegisterDevicesResponse:
        if not request.devices:
            raise InvalidArgument("at least one device is required", field="devices")
        if len(request.devices) > MAX_REGISTRATIONS:
            raise InvalidArgument(f"at most {MAX_REGISTRATIONS} per call", field="devices")
        registrations = []
        seen: set[str] = set()
        for i, d in enumerate(request.devices):
            fleet.check_device_id(d.device_id, field=f"devices[{i}].device_id")
            if d.device_id in seen:
                raise InvalidArgument(
                    f"{d.device_id!r} appears twice", field=f"devices[{i}].device_id"
                )
            seen.add(d.device_id)
            for name in ("model", "region"):
                if not getattr(d, name):
                    raise InvalidArgument("is required", field=f"devices[{i}].{name}")
            Version.parse(d.firmware, field=f"devices[{i}].firmware")
            registrations.append(
                fleet.Registration(d.device_id, d.model, d.region, d.firmware, dict(d.labels))
            )
        certificates = request.identity == fleet_pb2.DEVICE_IDENTITY_CERTIFICATE
        if certificates and self._device_ca is None:
            raise FailedPrecondition(
                "this control plane has no device CA (device_ca_cert_file)", field="identity"
            )
        now = self._clock.now()
        identity = fleet.CERTIFICATE if certificates else fleet.PASSWORD
        with self._store.transaction() as session:
            _refuse_control_account_names(session, [r.device_id for r in registrations])
            restored = [
                d.device_id
                for d in session.exec(
                    select(DeviceRow).where(
                        col(DeviceRow.device_id).in_(list(seen)), col(DeviceRow.revoked)
                    )
                )
            ]
            issued = fleet.register_devices(session, registrations, now, identity=identity)
            for r in registrations:
                if r.device_id in issued:
                    audit.record(
                        session,
                        "device",
                        r.device_id,
                        "register",
                        now=now,
                        reason=f"{r.model}, {r.region}, firmware {r.firmware}",
                        logged=False,
                    )
            # One INFO line for a batch, however many devices it registers.
            shown = ", ".join(sorted(issued)[:5]) + (", ..." if len(issued) > 5 else "")
            who = audit.requester()
            audit.after_commit(
                session,
                f"audit: {len(issued)} device(s) registered ({shown}) by {who.actor}"
                + (f" from {who.address}" if who.address else ""),
            )
        for device_id in issued:
            self._auth.forget_device(device_id)
        if restored and self._revocations is not None:
            self._revocations.restored(restored)
        if certificates:
            # Nothing for the broker: the certificate is the device's account.
            expires = convert.ts(now + fleet.ENROLLMENT_TOKEN_LIFETIME)
            credentials = [
                fleet_pb2.DeviceCredentials(
                    device_id=k, enrollment_token=v, enrollment_expire_time=expires
                )
                for k, v in issued.items()
            ]
        else:
            if self._accounts is not None:
                self._accounts.set_many(issued)
            credentials = [
                fleet_pb2.DeviceCredentials(device_id=k, secret=v) for k, v in issued.items()
            ]
        return fleet_pb2.RegisterDevicesResponse(
            credentials=credentials,
            mqtt_url=self._device_mqtt_url if certificates else self._mqtt_url,
            topic_root=self._topic_root,
        )

    def EnrollDevice(
        self, request: fleet_pb2.EnrollDeviceRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.DeviceCertificate:
        ca = self._require_ca()
        fleet.check_device_id(request.device_id)
        if not request.enrollment_token:
            raise InvalidArgument("is required", field="enrollment_token")
        csr = _csr(request.csr)
        now = self._clock.now()
        with self._store.transaction() as session:
            row = fleet.take_enrollment_token(
                session, request.device_id, request.enrollment_token, now
            )
            # Signed inside the transaction: a bad CSR leaves the token unspent.
            issued = ca.sign(csr, row.device_id, now)
            fleet.record_certificate(session, row, issued.serial, issued.not_after, now)
        return self._issued(request.device_id, issued, now)

    def RenewCertificate(
        self, request: fleet_pb2.RenewCertificateRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.DeviceCertificate:
        ca = self._require_ca()
        caller = caller_of(context)
        if caller.name != request.device_id:
            raise PermissionDenied("a device may only renew its own certificate", field="device_id")
        csr = _csr(request.csr)
        now = self._clock.now()
        with self._store.transaction() as session:
            row = fleet.get_device(session, request.device_id)
            issued = ca.sign(csr, row.device_id, now)
            fleet.record_certificate(session, row, issued.serial, issued.not_after, now)
        self._auth.forget_device(request.device_id)
        return self._issued(request.device_id, issued, now)

    def SignDeviceCsr(
        self, request: fleet_pb2.SignDeviceCsrRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.DeviceCertificate:
        ca = self._require_ca()
        fleet.check_device_id(request.device_id)
        csr = _csr(request.csr)
        now = self._clock.now()
        with self._store.transaction() as session:
            row = fleet.get_device(session, request.device_id)
            if row.revoked:
                raise FailedPrecondition(
                    "the device is revoked; register it again first", field="device_id"
                )
            issued = ca.sign(csr, row.device_id, now)
            fleet.record_certificate(session, row, issued.serial, issued.not_after, now)
            row.enroll_token_sha256 = ""
        self._auth.forget_device(request.device_id)
        return self._issued(request.device_id, issued, now)

    def GetDeviceCrl(
        self, request: fleet_pb2.GetDeviceCrlRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.DeviceCrl:
        return fleet_pb2.DeviceCrl(crl=self.device_crl().decode())

    def device_crl(self) -> bytes:
        ca = self._require_ca()
        now = self._clock.now()
        with self._store.transaction() as session:
            revoked = fleet.revoked_serials(session, now, superseded=self._crl_superseded)
        return ca.crl(revoked, now)

    def _require_ca(self) -> DeviceCa:
        if self._device_ca is None:
            raise FailedPrecondition(
                "this control plane has no device CA (device_ca_cert_file)", field="device_id"
            )
        return self._device_ca

    def _issued(
        self, device_id: str, issued: IssuedCertificate, now: datetime
    ) -> fleet_pb2.DeviceCertificate:
        if self._certificates_changed is not None:
            self._certificates_changed()
        lifetime = issued.not_after - now
        assert self._device_ca is not None
        return fleet_pb2.DeviceCertificate(
            device_id=device_id,
            certificate=issued.pem.decode(),
            ca_certificate=self._device_ca.pem.decode(),
            serial=issued.serial,
            expire_time=convert.ts(issued.not_after),
            renew_time=convert.ts(now + lifetime * RENEW_AFTER_FRACTION),
        )

    def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        selector = Selector.parse(request.selector)
        size = page_size(request.page_size)
        # A token is valid only for the listing it came from, revoked devices included or not.
        scope = f"{selector}|revoked" if request.include_revoked else str(selector)
        after = page_after(request.page_token, scope=scope)
        with self._store.transaction() as session:
            rows, total = fleet.list_devices(
                session,
                selector,
                after=after,
                limit=size + 1,
                include_revoked=request.include_revoked,
            )
        more = len(rows) > size
        rows = rows[:size]
        return fleet_pb2.ListDevicesResponse(
            devices=[convert.device(r) for r in rows],
            next_page_token=page_token(rows[-1].device_id, scope=scope) if more else "",
            total_size=total,
        )

    def GetDevice(
        self, request: fleet_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.GetDeviceResponse:
        if not 0 <= request.event_limit <= 1000:
            raise InvalidArgument("must be between 0 and 1000", field="event_limit")
        limit = request.event_limit or 50
        with self._store.transaction() as session:
            row = fleet.get_device(session, request.device_id)
            events = session.exec(
                select(DeviceEventRow)
                .where(DeviceEventRow.device_id == request.device_id)
                .order_by(col(DeviceEventRow.seq).desc())
                .limit(limit)
            ).all()
        flooded = self._flood_guard.dropped_if_flagged(row.device_id) if self._flood_guard else None
        return fleet_pb2.GetDeviceResponse(
            device=convert.device(row),
            events=[convert.device_event(e) for e in reversed(events)],
            rate_limited=flooded is not None,
            rate_limited_drops=flooded or 0,
        )

    def RevokeDevice(
        self, request: fleet_pb2.RevokeDeviceRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.Device:
        with self._store.transaction() as session:
            now = self._clock.now()
            row = fleet.revoke(session, request.device_id, now)
            identity = row.identity
            audit.record(session, "device", request.device_id, "revoke", now=now)
        self._auth.forget_device(request.device_id)
        if self._accounts is not None and identity == fleet.PASSWORD:
            self._accounts.remove(request.device_id)
        if self._revocations is not None:
            self._revocations.revoked([request.device_id])
        if self._certificates_changed is not None and identity == fleet.CERTIFICATE:
            self._certificates_changed()
        return convert.device(row)


def _csr(text: str) -> bytes:
    if not text.strip():
        raise InvalidArgument("is required", field="csr")
    return text.encode()


def _refuse_control_account_names(session: Session, device_ids: list[str]) -> None:
    """A device named like a control plane's broker account would hold that account."""
    control = control_accounts.usernames(session)
    for i, device_id in enumerate(device_ids):
        username = reserving_account(device_id, control)
        if username is not None:
            raise InvalidArgument(
                f"{device_id!r} is reserved: {username!r} and {username}-* are a control "
                "plane's broker accounts, and a device id is its broker username",
                field=f"devices[{i}].device_id",
            )
