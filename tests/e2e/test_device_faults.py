"""Faults of one device, end to end over the real broker: duplicates, late events, a flood.

The device here is a raw MQTT client with its own credentials, so it can do
what firmware with a bug (or a stolen identity) does: resend, reorder, flood.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.store.ingest import drop_counts
from ota.v1 import common_pb2, fleet_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle, MqttProbe
from tests.conftest import endpoint
from tests.e2e.scenario import (
    MODELS,
    get_rollout,
    publish,
    report,
    report_states,
    start_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e

FLOOD_RATE = 5.0
FLOOD_BURST = 100
MARKER_SEQ = 2**31 - 2  # the largest seq but one; the garbage below never uses it


def _register(client: Client, device_id: str, model: str) -> str:
    response = client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=device_id, model=model, region="eu", firmware="4.2.0"
                )
            ]
        ),
        metadata=client.metadata,
    )
    return str(response.credentials[0].secret)


def _start_rollout(client: Client, version: str, selector: str) -> rollout_pb2.Rollout:
    created: rollout_pb2.Rollout = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version=version,
            selector=selector,
            stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=0)],
            gate=rollout_pb2.FailureGate(max_failure_ppm=50_000, min_sample=5),
        ),
        metadata=client.metadata,
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id), metadata=client.metadata
    )
    return created


def _stored_seqs(client: Client, device_id: str) -> list[tuple[int, int]]:
    events = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id, event_limit=1000),
        metadata=client.metadata,
    ).events
    return [(e.seq, e.state) for e in events]


def _event(device_id: str, seq: int, state: int, rollout_id: str = "") -> common_pb2.DeviceEvent:
    return common_pb2.DeviceEvent(
        device_id=device_id, seq=seq, state=state, rollout_id=rollout_id, feature="lane-assist"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_stack(
    request: pytest.FixtureRequest, tmp_path: Path, broker: BrokerHandle
) -> Iterator[DevStack]:
    """A stack on SQLite or PostgreSQL: duplicates meet a different upsert on each."""
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_database")
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), database_url=database_url)
    try:
        yield dev
    finally:
        dev.stop()


def test_duplicate_and_late_events_never_move_a_device_backwards(
    any_db_stack: DevStack, broker: BrokerHandle, tmp_path: Path
) -> None:
    stack = any_db_stack
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secret = _register(client, "car-dup", "ev6")
        publish(client, stack, tmp_path, "1.0.0")
        rollout = _start_rollout(client, "1.0.0", 'model = "ev6"')
        rid = rollout.rollout_id
        wait_for(lambda: get_rollout(client, rid).exposed == 1, what="car-dup exposed")
        topic = "ota/v1/devices/car-dup/events"

        def send(car: MqttProbe, *events: common_pb2.DeviceEvent) -> None:
            for e in events:
                assert not car.publish(topic, e.SerializeToString()).is_failure

        with broker.client("car-dup", secret) as car:
            car.connect_ok()
            send(
                car,
                _event("car-dup", 1, common_pb2.NOTIFIED, rid),
                _event("car-dup", 2, common_pb2.DOWNLOADING, rid),
                _event("car-dup", 4, common_pb2.INSTALLED, rid),
            )
            wait_for(
                lambda: [s for s, _ in _stored_seqs(client, "car-dup")] == [1, 2, 4],
                what="the first three events stored",
            )
            # Now the late one (seq 3), QoS 1 redeliveries of seq 2 and 4, a reused
            # seq 4 claiming failure, and a marker (seq 5, no rollout) sent last: the
            # broker keeps one publisher's order, so once the marker is stored every
            # earlier message has been through ingest.
            send(
                car,
                _event("car-dup", 3, common_pb2.DOWNLOADED, rid),
                _event("car-dup", 2, common_pb2.DOWNLOADING, rid),
                _event("car-dup", 4, common_pb2.INSTALLED, rid),
                _event("car-dup", 4, common_pb2.FAILED, rid),
                # Text no column can hold (PostgreSQL refuses NUL and over-long values):
                # dropped as malformed, not a refused batch.
                common_pb2.DeviceEvent(
                    device_id="car-dup", seq=6, state=common_pb2.ACTIVE, detail="x\x00y"
                ),
                common_pb2.DeviceEvent(
                    device_id="car-dup", seq=7, state=common_pb2.ACTIVE, feature="f" * 65
                ),
                _event("car-dup", 5, common_pb2.NOTIFIED),
            )
        wait_for(
            lambda: [s for s, _ in _stored_seqs(client, "car-dup")] == [1, 2, 3, 4, 5],
            what="the marker stored",
        )
        assert _stored_seqs(client, "car-dup")[3] == (4, common_pb2.INSTALLED)
        with stack.control_plane.store.transaction() as session:
            assert drop_counts(session) == {"malformed": 2}
        r = report(client, rid)
        assert report_states(r) == {"INSTALLED": 1}
        assert r.events_ingested == 4  # seq 1-4 once each; duplicates are not events
        assert not r.failures_by_reason
        assert get_rollout(client, rid).device_states["INSTALLED"] == 1
    finally:
        client.close()


@pytest.fixture
def flood_stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"ingest_device_rate": FLOOD_RATE, "ingest_device_burst": FLOOD_BURST},
    )
    try:
        yield dev
    finally:
        dev.stop()


class Flood:
    """One device publishing valid events as fast as the broker takes them, in a thread."""

    def __init__(self, broker: BrokerHandle, device_id: str, secret: str) -> None:
        self._probe = broker.client(device_id, secret)
        self._device_id = device_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.sent = 0
        self.started = 0.0

    def __enter__(self) -> Flood:
        self._probe.__enter__()
        self._probe.connect_ok()
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._probe.__exit__(None, None, None)

    def _run(self) -> None:
        topic = f"ota/v1/devices/{self._device_id}/events"
        # Bounded in count as well as by the rollout's end.
        while not self._stop.is_set() and self.sent < 20_000:
            event = _event(self._device_id, self.sent + 1, common_pb2.NOTIFIED)
            self._probe.publish(topic, event.SerializeToString())
            self.sent += 1


def test_a_flooding_device_is_rate_limited_and_the_rollout_completes_exactly(
    flood_stack: DevStack,
    broker: BrokerHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack = flood_stack
    fleet = start_fleet(stack, tmp_path, 30)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secret = _register(client, "kiosk-flood", "kiosk")  # outside the rollout's selector
        publish(client, stack, tmp_path, "1.0.0")
        selector = "model in (" + ", ".join(MODELS) + ")"
        with (
            caplog.at_level(logging.WARNING, logger="ota.transport.ratelimit"),
            Flood(broker, "kiosk-flood", secret) as flood,
        ):
            wait_for(lambda: flood.sent > 3 * FLOOD_BURST, what="the flood under way")
            rid = _start_rollout(client, "1.0.0", selector).rollout_id
            wait_for(
                lambda: get_rollout(client, rid).state == rollout_pb2.ROLLOUT_STATE_COMPLETED,
                what="the rollout completed during the flood",
                timeout=180,
            )
            wait_for(
                lambda: report_states(report(client, rid)) == {"ACTIVE": 30},
                what="every device active",
                timeout=120,
            )

        def accounted() -> bool:
            with stack.control_plane.store.transaction() as session:
                limited = drop_counts(session).get("rate_limited", 0)
            return limited + len(_stored_seqs(client, "kiosk-flood")) == flood.sent

        # GetDevice lists up to 1000 events: the flood admitted stays below that.
        wait_for(accounted, what="every flood message stored or dropped", timeout=120)
        elapsed = time.monotonic() - flood.started

        # Other devices were unaffected: exact counts, every event they sent ingested.
        r = report(client, rid)
        assert report_states(r) == {"ACTIVE": 30} == dict(fleet.outcomes(rid))
        # Every step to ACTIVE; the last, USED, is 0: these devices report no use.
        assert [(s.step, s.devices) for s in r.funnel][-1] == ("USED", 0)
        assert [s.devices for s in r.funnel] == [30] * 6 + [0]
        assert r.events_ingested == sum(d.record.events_sent for d in fleet.devices)

        # The flood was cut to the bucket: the burst plus the rate over the time it ran.
        stored = len(_stored_seqs(client, "kiosk-flood"))
        assert FLOOD_BURST <= stored <= FLOOD_BURST + FLOOD_RATE * elapsed + 1
        with stack.control_plane.store.transaction() as session:
            limited = drop_counts(session)["rate_limited"]
        assert limited == flood.sent - stored > 0

        # The device is flagged where an operator looks, and named once per interval.
        seen = client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id="kiosk-flood"), metadata=client.metadata
        )
        assert seen.rate_limited and seen.rate_limited_drops == limited
        calm = client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id=fleet.devices[0].device_id),
            metadata=client.metadata,
        )
        assert not calm.rate_limited and calm.rate_limited_drops == 0
        shown = subprocess.run(
            [sys.executable, "-m", "ota.cli.main", "fleet", "get", "kiosk-flood"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=True,
            env={**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": stack.admin_token},
        )
        assert f"rate limited: {limited} messages dropped" in shown.stdout
        warnings = [r.getMessage() for r in caplog.records if r.name == "ota.transport.ratelimit"]
        assert 1 <= len(warnings) <= 1 + elapsed / 60
        assert all("kiosk-flood" in w for w in warnings)
    finally:
        client.close()
        fleet.stop()


def _garbage(rng: random.Random, device_id: str, n: int) -> Iterator[bytes]:
    """Random bytes and mutated valid events: what a broken or hostile device sends."""
    for i in range(n):
        if i % 3 == 0:
            yield rng.randbytes(rng.randrange(0, 200))
            continue
        event = common_pb2.DeviceEvent(
            device_id=rng.choice([device_id, "car-other", ""]),
            seq=rng.choice([0, 1, 2**31 - 1, 2**63 - 1, 2**64 - 1, rng.randrange(1, MARKER_SEQ)]),
            state=rng.randrange(0, 15),
            error_code=rng.randrange(0, 15),
            rollout_id=rng.choice(["", "r-00000000", "r\x00", "r" * 40]),
            feature=rng.choice(["", "lane-assist", "f\x00", "é" * 70]),
            detail=rng.choice(["", "boom", "\x00", "x" * 5000]),
            bundle_sha256=rng.randbytes(rng.choice([0, 32, 100])),
            health=common_pb2.HealthSample(
                crash_count=rng.choice([0, 1, 2**31, 2**32 - 1]),
                uptime_seconds=rng.choice([0, 2**64 - 1]),
            ),
        )
        event.time.seconds = rng.choice([0, -(2**62), 2**62, 1_700_000_000])
        data = bytearray(event.SerializeToString())
        for _ in range(rng.randrange(0, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        yield bytes(data[: rng.randrange(len(data) + 1)] if i % 5 == 0 else data)


def test_garbage_from_a_device_is_dropped_by_reason_and_ingest_keeps_going(
    any_db_stack: DevStack, broker: BrokerHandle
) -> None:
    stack = any_db_stack
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secret = _register(client, "car-noise", "ev6")
        topic = "ota/v1/devices/car-noise/events"
        with broker.client("car-noise", secret) as car:
            car.connect_ok()
            for payload in _garbage(random.Random(20260501), "car-noise", 300):
                assert not car.publish(topic, payload).is_failure
            marker = _event("car-noise", MARKER_SEQ, common_pb2.NOTIFIED)
            assert not car.publish(topic, marker.SerializeToString()).is_failure
        wait_for(
            lambda: (MARKER_SEQ, common_pb2.NOTIFIED) in _stored_seqs(client, "car-noise"),
            what="the marker after the garbage stored",
        )
        with stack.control_plane.store.transaction() as session:
            drops = drop_counts(session)
        # Every refusal has its reason (the decoder's, or an unknown rollout named):
        # none reached the store and failed there.
        assert set(drops) <= {"malformed", "device_mismatch", "unknown_rollout"}, drops
        assert sum(drops.values()) > 150
        assert stack.control_plane.ingester.dropped.get("store_refused", 0) == 0
    finally:
        client.close()
