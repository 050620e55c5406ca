"""Faults mid-rollout: the broker restarts, loses its retained state, the database goes away,
devices miss a whole stage. Each run ends converged, with the report equal to what the
devices did and every event counted once.
"""

from __future__ import annotations

import gc
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import func, select

from device_sim.fleet import SimulatedFleet
from ota.app import ControlPlane
from ota.broker import BrokerSettings
from ota.client import Client
from ota.devstack import DevStack
from ota.domain.bucketing import is_exposed
from ota.store.models import DesiredStateRow, DeviceEventRow
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle, private_broker
from tests.conftest import endpoint
from tests.e2e.processes import (
    assert_rollout_converged,
    patient_fleet,
    start_promoted_rollout,
    try_get_rollout,
    try_promote,
)
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e

DEVICES = 120
STAGES = [100_000, 400_000, 1_000_000]


class Rollout:
    """A rollout on a fleet, moved stage by stage by the test (each stage soaks an hour)."""

    def __init__(self, stack: DevStack, tmp_path: Path, *, health_interval: float = 0.0) -> None:
        self.stack = stack
        self.fleet = patient_fleet(
            stack.server,
            stack.admin_token,
            stack.keys,
            tmp_path / "devices",
            DEVICES,
            health_interval=health_interval,
        )
        self.fleet.start()
        self.client = Client.connect(stack.server, stack.admin_token)
        self.rollout_id = start_promoted_rollout(self.client, stack.keys, tmp_path, STAGES)
        self.promoted: set[int] = set()

    def get(self) -> rollout_pb2.Rollout | None:
        return try_get_rollout(self.client, self.rollout_id)

    def settled(self, index: int, *, offline: int = 0) -> bool:
        """Stage `index` is current and every exposed device but `offline` ones is ACTIVE."""
        r = self.get()
        return (
            r is not None
            and r.current_stage == index
            and r.exposed > offline
            and r.device_states.get("ACTIVE", 0) == r.exposed - offline
        )

    def promote_to(self, index: int) -> None:
        """Promote each stage once until the engine entered stage `index`."""

        def entered() -> bool:
            r = self.get()
            if r is not None and r.current_stage < index and r.current_stage not in self.promoted:
                landed = try_promote(self.client, self.rollout_id)
                if landed is not None:
                    self.promoted.add(landed)
            return r is not None and r.current_stage >= index

        wait_for(entered, what=f"stage {index + 1} entered", timeout=120)

    def finish(self) -> None:
        """Promote the rest, wait for completion, and check the counts are exact."""
        self.promote_to(len(STAGES) - 1)

        def completed() -> bool:
            r = self.get()
            if (
                r is not None
                and r.current_stage not in self.promoted
                and (landed := try_promote(self.client, self.rollout_id)) is not None
            ):
                self.promoted.add(landed)
            return r is not None and r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED

        wait_for(completed, what="the rollout completing", timeout=180)
        assert_rollout_converged(self.client, self.fleet, self.rollout_id, DEVICES, len(STAGES))

    def close(self) -> None:
        self.client.close()
        # MQTT clients that a broker restart cut off are finalised while the fleet's
        # event loop still runs: once it is closed their sockets cannot unregister.
        gc.collect()
        self.fleet.stop()

    def into_second_stage_with_devices_away(self, count: int) -> list[str]:
        """Enter the second stage while `count` of its devices are offline; return them.

        Returns once their desired states are published and the stage's other
        devices are done: when they come back they find their state retained and
        report, whatever state the database is in then.
        """
        current = self.get()
        assert current is not None
        salt = bytes.fromhex(current.salt_hex)
        away = [
            d.device_id
            for d in self.fleet.devices
            if is_exposed(salt, d.device_id, STAGES[1])
            and not is_exposed(salt, d.device_id, STAGES[0])
        ][:count]
        assert len(away) >= 3
        wait_for(lambda: self.settled(0), what="the first stage installed")
        self.fleet.disconnect(away)
        self.promote_to(1)

        def published() -> bool:
            with self.stack.control_plane.store.transaction() as session:
                rows = [session.get(DesiredStateRow, d) for d in away]
            return all(r is not None and r.published_generation == r.generation for r in rows)

        wait_for(published, what="the second stage's desired states published")
        # The others finish first: their retries would otherwise hold the fleet's workers.
        wait_for(
            lambda: self.settled(1, offline=len(away)),
            what="the second stage's online devices installed",
            timeout=120,
        )
        return away

    def reconnect_and_report(self, devices: list[str]) -> None:
        """Bring `devices` back and wait until they have reported (stored or not)."""
        before = sum(d.record.events_sent for d in self.fleet.devices)
        self.fleet.reconnect(devices)
        wait_for(
            lambda: sum(d.record.events_sent for d in self.fleet.devices) >= before + len(devices),
            what="the returning devices' events",
        )

    def assert_unavailable(self, *, write: bool = False) -> None:
        """A read (or a command) now fails with the retryable UNAVAILABLE, not INTERNAL."""
        with pytest.raises(grpc.RpcError) as refused:
            if write:
                self.client.rollouts.PauseRollout(
                    rollout_pb2.RolloutCommandRequest(rollout_id=self.rollout_id, reason="test"),
                    metadata=self.client.metadata,
                    timeout=90,
                )
            else:
                self.client.rollouts.GetRollout(
                    rollout_pb2.GetRolloutRequest(rollout_id=self.rollout_id),
                    metadata=self.client.metadata,
                    timeout=90,
                )
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()


@pytest.fixture
def stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker))
    try:
        yield dev
    finally:
        dev.stop()


def _not_yet_exposed(fleet: SimulatedFleet, rollout_id: str, count: int) -> list[str]:
    waiting = [d.device_id for d in fleet.devices if rollout_id not in d.record.last_state]
    assert len(waiting) >= count
    return waiting[:count]


def test_a_broker_restart_mid_stage_loses_nothing(
    tmp_path: Path, broker: BrokerHandle, stack: DevStack
) -> None:
    run = Rollout(stack, tmp_path)
    try:
        wait_for(lambda: run.settled(0), what="the first stage installed", timeout=120)
        run.promote_to(1)
        # Mid-stage: the second stage's devices are being notified and installing.
        wait_for(
            lambda: (r := run.get()) is not None and r.device_states.get("ACTIVE", 0) < r.exposed,
            what="the second stage in flight",
        )
        broker.restart()  # same port and persistence directory: sessions and retained kept
        wait_for(stack.control_plane.link.connected.is_set, what="the control plane reconnected")
        # Mosquitto 2.0 routes nothing to a restored session until its client is back;
        # devices send again what the broker could deliver to nobody (device_sim.routing).
        run.finish()
    finally:
        run.close()


@pytest.mark.parametrize("persistence", [True, False], ids=["retained", "no-retained-state"])
def test_devices_offline_for_whole_stages_get_exactly_the_current_truth(
    tmp_path: Path, persistence: bool
) -> None:
    settings = BrokerSettings(port=0, persistence=persistence)
    with private_broker(tmp_path / "broker", settings=settings) as broker:
        stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker))
        run: Rollout | None = None
        try:
            run = Rollout(stack, tmp_path)
            wait_for(lambda: run is not None and run.settled(0), what="the first stage installed")
            away = _not_yet_exposed(run.fleet, run.rollout_id, 8)
            run.fleet.disconnect(away)
            run.promote_to(len(STAGES) - 1)
            wait_for(
                lambda: run is not None and run.settled(len(STAGES) - 1, offline=len(away)),
                what="every online device active at the last stage",
                timeout=120,
            )
            # The missing devices keep the rollout from completing: offline is not success.
            current = run.get()
            assert current is not None and current.exposed == DEVICES
            assert current.state == rollout_pb2.ROLLOUT_STATE_RUNNING
            assert current.device_states.get("ACTIVE", 0) == DEVICES - len(away)
            if not persistence:
                # A broker without persistence forgets every retained desired state: the
                # returning devices find none and pull theirs over gRPC.
                broker.restart()
                wait_for(stack.control_plane.link.connected.is_set, what="the plane reconnected")
            run.fleet.reconnect(away)
            run.finish()
            with stack.control_plane.store.transaction() as session:
                issued = {d: session.get(DesiredStateRow, d) for d in away}
            for device_id in away:
                device = run.fleet.device(device_id)
                row = issued[device_id]
                assert row is not None
                # The latest desired state, and each step of its install reported once.
                assert device.trust.accepted_generation == row.generation
                sent = device.record.events_by_rollout[run.rollout_id]
                assert sent == len(device.record.states_seen[run.rollout_id])
        finally:
            if run is not None:
                run.close()
            stack.stop()


def _set_connections(admin_url: str, database: str, *, allowed: bool) -> None:
    """Refuse (and end) or allow again every connection to `database`."""
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {allowed}'))
            if not allowed:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": database},
                )
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_while_the_database_is_away_rpcs_are_unavailable_and_events_wait_unacked(
    tmp_path: Path, broker: BrokerHandle, postgres_url: str, postgres_database: str
) -> None:
    admin_url = str(make_url(postgres_url).set(drivername="postgresql+psycopg"))
    database = make_url(postgres_database).database
    assert database is not None
    stack = DevStack.start(
        tmp_path / "stack", broker=endpoint(broker), database_url=postgres_database
    )
    run: Rollout | None = None
    try:
        # Devices send a health sample every half second: events that keep coming while
        # the database is away (a device cannot even start an install then: its TUF
        # metadata comes from the control plane's database).
        run = Rollout(stack, tmp_path, health_interval=0.5)
        wait_for(lambda: run is not None and run.settled(0), what="the first stage installed")
        run.promote_to(1)
        _set_connections(admin_url, database, allowed=False)
        try:
            run.assert_unavailable()
            before = _samples_sent(run.fleet)
            wait_for(
                lambda: run is not None and _samples_sent(run.fleet) >= before + 20,
                what="health samples sent while the database is away",
            )
            # The control plane stops with those unacknowledged: the broker keeps them
            # for its session and hands them to the next process.
            stack.control_plane.stop()
        finally:
            _set_connections(admin_url, database, allowed=True)
        stack.control_plane = ControlPlane.build(stack.control_plane.config)
        stack.control_plane.start()
        run.finish()
        run.fleet.stop()  # no more events: every one the broker acknowledged is stored
        sent = sum(d.record.events_sent for d in run.fleet.devices)
        wait_for(lambda: _events_stored(stack) >= sent, what=f"all {sent} events stored")
        # At most the one publish per device cut off by the stop, stored but not counted.
        assert _events_stored(stack) <= sent + DEVICES
    finally:
        if run is not None:
            run.close()
        stack.stop()


def _samples_sent(fleet: SimulatedFleet) -> int:
    return sum(sum(d.record.periodic_samples.values()) for d in fleet.devices)


def _events_stored(stack: DevStack) -> int:
    with stack.control_plane.store.transaction() as session:
        return int(session.exec(select(func.count()).select_from(DeviceEventRow)).one())


def test_a_sqlite_lock_held_past_the_busy_timeout_is_unavailable_then_nothing_is_lost(
    tmp_path: Path, stack: DevStack
) -> None:
    run = Rollout(stack, tmp_path)
    try:
        late = run.into_second_stage_with_devices_away(5)
        # Another process holds the write lock: in WAL mode reads go on, and every write
        # of the control plane (commands, ingest, the engine, the lease) waits out its
        # 30 s busy timeout and fails.
        lock = sqlite3.connect(stack.state_dir / "ota.db", isolation_level=None, timeout=60)
        try:
            lock.execute("BEGIN IMMEDIATE")
            run.reconnect_and_report(late)
            run.assert_unavailable(write=True)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        run.finish()
    finally:
        run.close()
