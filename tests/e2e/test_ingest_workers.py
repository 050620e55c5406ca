"""Ingest worker processes, end to end: the real broker, a real control plane, a real database.

The control plane runs with `ingest_workers = 2`: two child processes share
the device events with the broker's shared subscription. Devices are raw MQTT
clients with their own credentials, publishing events of a running rollout.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from ota.client import Client
from ota.devstack import DevStack
from ota.keyring import generate_keyring
from ota.store.ingest import drop_counts
from ota.v1 import common_pb2, fleet_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.processes import ControlPlaneProcess, listen_port, serve_config
from tests.e2e.scenario import get_rollout, publish, wait_for

pytestmark = pytest.mark.e2e

WORKERS = 2
FEATURE = "lane-assist"


def _worker_stack(
    tmp_path: Path, broker: BrokerHandle, database_url: str, **overrides: object
) -> DevStack:
    stack = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        database_url=database_url,
        config_overrides={"ingest_workers": WORKERS, **overrides},
    )
    # Until then the control plane's own session ingests (nothing is lost meanwhile),
    # and these tests are about the workers.
    assert stack.control_plane.ingest.wait_ready(120), "the workers never subscribed"
    return stack


def _register(client: Client, device_ids: list[str]) -> dict[str, str]:
    response = client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=d, model="ev6", region="eu", firmware="4.2.0"
                )
                for d in device_ids
            ]
        ),
        metadata=client.metadata,
    )
    return {c.device_id: c.secret for c in response.credentials}


def _running_rollout(client: Client, stack: DevStack, tmp_path: Path, devices: int) -> str:
    publish(client, stack, tmp_path, "1.0.0")
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature=FEATURE,
            version="1.0.0",
            selector='model = "ev6"',
            stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
        ),
        metadata=client.metadata,
    )
    rid = str(created.rollout_id)
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=rid), metadata=client.metadata
    )
    wait_for(lambda: get_rollout(client, rid).exposed == devices, what="every device exposed")
    return rid


# The install lifecycle, then ACTIVE again and again (health samples, in effect).
_STATES = [
    common_pb2.NOTIFIED,
    common_pb2.DOWNLOADING,
    common_pb2.DOWNLOADED,
    common_pb2.VERIFIED,
    common_pb2.INSTALLED,
    common_pb2.ACTIVE,
]


def _event(device_id: str, seq: int, rollout_id: str) -> bytes:
    state = _STATES[min(seq - 1, len(_STATES) - 1)]
    return common_pb2.DeviceEvent(
        device_id=device_id,
        seq=seq,
        state=state,
        rollout_id=rollout_id,
        feature=FEATURE,
        version="1.0.0",
    ).SerializeToString()


class Devices:
    """Each device on its own MQTT connection; publishes wait for the broker's PUBACK."""

    def __init__(self, broker: BrokerHandle, secrets: dict[str, str]) -> None:
        self.probes = {d: broker.client(d, s) for d, s in secrets.items()}

    def __enter__(self) -> Devices:
        for probe in self.probes.values():
            probe.__enter__()
            probe.connect_ok()
        return self

    def __exit__(self, *exc: object) -> None:
        for probe in self.probes.values():
            probe.__exit__(None, None, None)

    def send(self, device_id: str, payloads: list[bytes]) -> None:
        probe = self.probes[device_id]
        infos = [
            probe.client.publish(f"ota/v1/devices/{device_id}/events", p, qos=1) for p in payloads
        ]
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published()

    def events(self, rollout_id: str, seqs: range) -> None:
        """Every device sends events `seqs`, all devices at once."""
        threads = [
            threading.Thread(target=self.send, args=(d, [_event(d, s, rollout_id) for s in seqs]))
            for d in self.probes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)


def _stored(stack: DevStack) -> dict[str, list[int]]:
    with stack.control_plane.store.transaction() as session:
        rows = session.connection().execute(
            text("SELECT device_id, seq FROM device_event ORDER BY device_id, seq")
        )
        stored: dict[str, list[int]] = {}
        for device_id, seq in rows:
            stored.setdefault(device_id, []).append(seq)
        return stored


def _scrape(stack: DevStack) -> dict[str, float]:
    url = f"http://{stack.control_plane.metrics_address}/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        lines = answer.read().decode().splitlines()
    samples: dict[str, float] = {}
    for line in lines:
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@pytest.fixture
def worker_stack(tmp_path: Path, broker: BrokerHandle, database_url: str) -> Iterator[DevStack]:
    stack = _worker_stack(tmp_path, broker, database_url)
    try:
        yield stack
    finally:
        stack.stop()


def test_workers_store_every_event_once_and_the_parent_counts_and_logs_for_them(
    worker_stack: DevStack,
    broker: BrokerHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stack = worker_stack
    ingest = stack.control_plane.ingest
    assert ingest.alive() == WORKERS and len(set(ingest.pids().values())) == WORKERS
    assert os.getpid() not in ingest.pids().values()
    progressed: list[frozenset[str]] = []
    ingest.on_progress = progressed.append
    devices, per_device, bad = 30, 20, 7
    ids = [f"car-{i:03d}" for i in range(devices)]
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secrets = _register(client, ids)
        rid = _running_rollout(client, stack, tmp_path, devices)
        with (
            caplog.at_level(logging.WARNING, logger="ota.transport.ingester"),
            Devices(broker, secrets) as fleet,
        ):
            fleet.events(rid, range(1, per_device + 1))
            # Undecodable payloads from one device: dropped, counted, logged.
            fleet.send(ids[0], [b"\xff\x00not an event"] * bad)
            wait_for(
                lambda: (
                    ingest.stored == devices * per_device
                    and ingest.dropped.get("malformed", 0) == bad
                ),
                what="every event stored and every bad payload counted",
                timeout=120,
            )
        stored = _stored(stack)
        assert stored == {d: list(range(1, per_device + 1)) for d in ids}
        with stack.control_plane.store.transaction() as session:
            assert drop_counts(session) == {"malformed": bad}
        assert get_rollout(client, rid).device_states["ACTIVE"] == devices
        # The parent learnt that the rollout's progress moved.
        assert progressed and set().union(*progressed) == {rid}
        # The workers' drops were logged through the parent, marked with the worker.
        dropped_logs = [
            r for r in caplog.records if r.getMessage().startswith("dropped device message")
        ]
        assert len(dropped_logs) == bad
        assert {getattr(r, "ingest_worker", None) for r in dropped_logs} <= {1, 2}
        assert all(getattr(r, "device_id", None) == ids[0] for r in dropped_logs)
        # The parent's /metrics shows the totals of both workers.
        samples = _scrape(stack)
        assert samples["ota_ingest_events_stored_total"] == devices * per_device
        assert samples['ota_ingest_dropped_total{reason="malformed"}'] == bad
        assert samples["ota_ingest_workers"] == WORKERS
        assert samples["ota_ingest_backlog_messages"] == 0
    finally:
        client.close()


def test_a_flooding_device_spends_one_bucket_across_the_workers(
    tmp_path: Path, broker: BrokerHandle, database_url: str
) -> None:
    rate, burst, sent = 2.0, 50, 400
    stack = _worker_stack(
        tmp_path,
        broker,
        database_url,
        ingest_device_rate=rate,
        ingest_device_burst=burst,
    )
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secrets = _register(client, ["kiosk-flood", "car-calm"])
        with Devices(broker, secrets) as fleet:
            t0 = time.monotonic()
            fleet.send("kiosk-flood", [_event("kiosk-flood", s, "") for s in range(1, sent + 1)])
            fleet.send("car-calm", [_event("car-calm", s, "") for s in range(1, 4)])
            ingest = stack.control_plane.ingest
            wait_for(
                lambda: ingest.stored + ingest.dropped.get("rate_limited", 0) == sent + 3,
                what="every message stored or dropped",
                timeout=120,
            )
            elapsed = time.monotonic() - t0
        stored = _stored(stack)
        # The broker spread the flood over both workers, yet one bucket cut it: the
        # burst plus the rate over the time it ran (two buckets would pass twice the burst).
        assert burst <= len(stored["kiosk-flood"]) <= burst + rate * elapsed + 1
        assert stored["car-calm"] == [1, 2, 3]
        limited = ingest.dropped["rate_limited"]
        assert limited == sent - len(stored["kiosk-flood"])
        seen = client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id="kiosk-flood"), metadata=client.metadata
        )
        assert seen.rate_limited and seen.rate_limited_drops == limited
    finally:
        client.close()
        stack.stop()


def test_a_killed_worker_is_restarted_and_nothing_is_lost(
    worker_stack: DevStack, broker: BrokerHandle, tmp_path: Path
) -> None:
    stack = worker_stack
    ingest = stack.control_plane.ingest
    devices, per_device = 20, 150
    ids = [f"car-{i:03d}" for i in range(devices)]
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secrets = _register(client, ids)
        rid = _running_rollout(client, stack, tmp_path, devices)
        with Devices(broker, secrets) as fleet:
            sending = threading.Thread(target=fleet.events, args=(rid, range(1, per_device + 1)))
            sending.start()
            wait_for(lambda: ingest.stored > 200, what="ingest under way")
            victim = ingest.pids()[1]
            os.kill(victim, signal.SIGKILL)
            wait_for(
                lambda: ingest.restarts == 1 and ingest.pids().get(1) not in (None, victim),
                what="the killed worker restarted",
            )
            sending.join(timeout=120)
            # Then the rest: the restarted worker takes its share again.
            fleet.events(rid, range(per_device + 1, per_device + 11))
            total = devices * (per_device + 10)
            wait_for(lambda: ingest.stored == total, what="every event stored", timeout=120)
        # At least once from the broker, once in the store: every event, none twice.
        assert _stored(stack) == {d: list(range(1, per_device + 11)) for d in ids}
        assert ingest.alive() == WORKERS
        assert get_rollout(client, rid).device_states["ACTIVE"] == devices
    finally:
        client.close()


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_workers_do_not_outlive_a_killed_control_plane(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    port = listen_port()
    token = os.urandom(24).hex()
    plane = ControlPlaneProcess(
        serve_config(
            tmp_path / "serve.toml",
            broker,
            keys,
            f"127.0.0.1:{port}",
            token,
            ingest_workers=WORKERS,
        ),
        f"127.0.0.1:{port}",
        token,
        tmp_path / "serve.log",
    )
    try:
        plane.start()
        assert plane.process is not None
        parent = plane.process.pid
        wait_for(lambda: len(_children(parent)) >= WORKERS, what="the workers started")
        workers = _children(parent)
        plane.kill()
        wait_for(
            lambda: not any(_running(pid) for pid in workers), what="the workers ended with it"
        )
    finally:
        plane.stop()


def test_sessions_of_workers_no_longer_configured_are_drained_and_ended(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    database_url = f"sqlite:///{tmp_path / 'stack' / 'ota.db'}"
    ids = [f"car-{i:03d}" for i in range(10)]
    first = _worker_stack(tmp_path, broker, database_url)
    try:
        client = Client.connect(first.server, first.admin_token)
        try:
            secrets = _register(client, ids)
        finally:
            client.close()
    finally:
        first.stop()  # the workers' sessions keep the subscription at the broker
    with Devices(broker, secrets) as fleet:
        # Queued for the two workers' sessions while no control plane runs.
        fleet.events("", range(1, 21))
        second = DevStack.start(
            tmp_path / "stack",
            broker=endpoint(broker),
            database_url=database_url,
            config_overrides={"ingest_workers": 0},
        )
        try:
            ingest = second.control_plane.ingest
            wait_for(lambda: ingest.stored == 200, what="the queued events stored", timeout=120)
            wait_for(lambda: not ingest.retiring(), what="both sessions ended", timeout=120)
            sessions = tmp_path / "stack" / "data" / "ingest" / f"{broker.control_username}.workers"
            assert sessions.read_text().strip() == "0"
            # The broker no longer splits events with sessions nobody resumes: all of
            # these reach the control plane's own session.
            fleet.events("", range(21, 41))
            wait_for(lambda: ingest.stored == 400, what="the later events stored", timeout=120)
            assert _stored(second) == {d: list(range(1, 41)) for d in ids}
        finally:
            second.stop()
