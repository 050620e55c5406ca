"""FleetService: provisioning, listing, history and revocation of devices."""

from __future__ import annotations

from typing import Protocol

import grpc
from sqlmodel import col, select

from ota.api import convert
from ota.api.auth import Authenticator
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.domain.selector import Selector
from ota.domain.version import Version
from ota.errors import InvalidArgument
from ota.store import audit, fleet
from ota.store.models import DeviceEventRow
from ota.store.session import Store
from ota.v1 import fleet_pb2, fleet_pb2_grpc

MAX_REGISTRATIONS = 10_000


class BrokerAccounts(Protocol):
    """Where device broker credentials go (a Mosquitto password file, ...)."""

    def set_many(self, secrets: dict[str, str]) -> None: ...
    def remove(self, username: str) -> None: ...


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
    ) -> None:
        self._flood_guard = flood_guard
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
        with self._store.transaction() as session:
            now = self._clock.now()
            issued = fleet.register_devices(session, registrations, now)
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
        if self._accounts is not None:
            self._accounts.set_many(issued)
        return fleet_pb2.RegisterDevicesResponse(
            credentials=[
                fleet_pb2.DeviceCredentials(device_id=k, secret=v) for k, v in issued.items()
            ],
            mqtt_url=self._mqtt_url,
            topic_root=self._topic_root,
        )

    def ListDevices(
        self, request: fleet_pb2.ListDevicesRequest, context: grpc.ServicerContext
    ) -> fleet_pb2.ListDevicesResponse:
        selector = Selector.parse(request.selector)
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope=str(selector))
        with self._store.transaction() as session:
            rows, total = fleet.list_devices(session, selector, after=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return fleet_pb2.ListDevicesResponse(
            devices=[convert.device(r) for r in rows],
            next_page_token=page_token(rows[-1].device_id, scope=str(selector)) if more else "",
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
            row = fleet.revoke(session, request.device_id)
            audit.record(session, "device", request.device_id, "revoke", now=self._clock.now())
        self._auth.forget_device(request.device_id)
        if self._accounts is not None:
            self._accounts.remove(request.device_id)
        return convert.device(row)
