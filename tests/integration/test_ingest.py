"""Telemetry ingest over the real broker into the real database: drops counted, duplicates once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import col, func, select

from ota.client import Client
from ota.devstack import DevStack
from ota.store.ingest import drop_counts
from ota.store.models import DeviceEventRow
from ota.v1 import common_pb2, fleet_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, broker: BrokerHandle, database_url: str) -> Iterator[DevStack]:
    """The dev stack over each kind of database the store supports."""
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), database_url=database_url)
    try:
        yield dev
    finally:
        dev.stop()


def _register(stack: DevStack, *ids: str) -> dict[str, str]:
    client = Client.connect(stack.server, stack.admin_token)
    try:
        response = client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=i, model="ev6", region="eu", firmware="4.2"
                    )
                    for i in ids
                ]
            ),
            metadata=client.metadata,
        )
    finally:
        client.close()
    return {c.device_id: c.secret for c in response.credentials}


def _events(stack: DevStack, device_id: str) -> list[int]:
    with stack.control_plane.store.transaction() as session:
        return list(
            session.exec(
                select(DeviceEventRow.seq)
                .where(DeviceEventRow.device_id == device_id)
                .order_by(col(DeviceEventRow.seq))
            )
        )


def _drops(stack: DevStack) -> dict[str, int]:
    with stack.control_plane.store.transaction() as session:
        return drop_counts(session)


def test_bad_payloads_are_acked_counted_and_dropped_and_good_ones_stored_once(
    stack: DevStack, broker: BrokerHandle
) -> None:
    secrets = _register(stack, "car-1", "car-2")
    topic = "ota/v1/devices/car-1/events"
    event = common_pb2.DeviceEvent(device_id="car-1", seq=1, state=common_pb2.NOTIFIED)
    impostor = common_pb2.DeviceEvent(device_id="car-2", seq=1, state=common_pb2.ACTIVE)
    with broker.client("car-1", secrets["car-1"]) as car:
        car.connect_ok()
        assert not car.publish(topic, b"\xff\x00 not a protobuf").is_failure
        assert not car.publish(topic, impostor.SerializeToString()).is_failure
        assert not car.publish(topic, b"\x08" * 70_000).is_failure  # over the 64 KiB limit
        huge = common_pb2.DeviceEvent(device_id="car-1", seq=2**63 + 5, state=common_pb2.NOTIFIED)
        assert not car.publish(topic, huge.SerializeToString()).is_failure  # beyond int64
        for _ in range(3):  # QoS 1 redelivery: the same seq three times
            car.publish(topic, event.SerializeToString())
        marker = common_pb2.DeviceEvent(device_id="car-1", seq=2, state=common_pb2.DOWNLOADING)
        car.publish(topic, marker.SerializeToString())

    wait_for(lambda: _events(stack, "car-1") == [1, 2], what="both distinct events stored")
    wait_for(
        lambda: _drops(stack) == {"malformed": 2, "device_mismatch": 1, "oversized": 1},
        what="four drops counted by reason",
    )
    assert _events(stack, "car-2") == []
    with stack.control_plane.store.transaction() as session:
        total = session.exec(select(func.count()).select_from(DeviceEventRow)).one()
    assert total == 2


def test_events_queued_while_the_control_plane_is_down_are_ingested_after_restart(
    stack: DevStack, broker: BrokerHandle
) -> None:
    secrets = _register(stack, "car-9")
    plane = stack.control_plane
    plane.stop()
    with broker.client("car-9", secrets["car-9"]) as car:
        car.connect_ok()
        for seq in range(1, 6):
            e = common_pb2.DeviceEvent(device_id="car-9", seq=seq, state=common_pb2.NOTIFIED)
            car.publish("ota/v1/devices/car-9/events", e.SerializeToString())
    from ota.app import ControlPlane

    restarted = ControlPlane.build(plane.config)
    restarted.start()
    stack.control_plane = restarted
    wait_for(lambda: _events(stack, "car-9") == [1, 2, 3, 4, 5], what="queued events delivered")
