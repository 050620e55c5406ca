"""The control plane reacts: rollouts move on signals, and health tells the truth.

Every poll a signal replaces is set to an hour here, so a rollout that
completes, a watch that sees each change, can only be the signals' work,
also when the command was served by another replica (PostgreSQL notices).
Health is watched over gRPC's own Health.Watch stream while the broker and
the database really go away and come back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from ota.api import rollouts as rollouts_api
from ota.broker import BrokerSettings
from ota.client import Client
from ota.config import BOUNDS, Bound
from ota.devstack import DevStack
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle, private_broker
from tests.conftest import endpoint
from tests.e2e.scenario import publish, run_rollout, start_fleet, wait_for

pytestmark = pytest.mark.e2e

HOUR = 3600.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def unpolled_stack(
    tmp_path: Path, broker: BrokerHandle, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DevStack]:
    """A control plane whose engine, publisher and WatchRollout poll once an hour."""
    monkeypatch.setitem(BOUNDS, "engine_interval_seconds", Bound(0.01, HOUR, "seconds"))
    monkeypatch.setitem(BOUNDS, "publish_poll_seconds", Bound(0.05, HOUR, "seconds"))
    monkeypatch.setattr(rollouts_api, "WATCH_POLL_SECONDS", HOUR)
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"engine_interval_seconds": HOUR, "publish_poll_seconds": HOUR},
    )
    try:
        yield dev
    finally:
        dev.stop()


def test_a_rollout_runs_to_completion_on_signals_alone(
    tmp_path: Path, unpolled_stack: DevStack
) -> None:
    fleet = start_fleet(unpolled_stack, tmp_path, 30)
    client = Client.connect(unpolled_stack.server, unpolled_stack.admin_token)
    try:
        publish(client, unpolled_stack, tmp_path, "1.0.0")
        # Start wakes the engine; its exposure wakes the publisher; devices' reports
        # wake the engine to advance and complete; each change wakes the watch.
        last = run_rollout(client, "1.0.0", [300_000, 1_000_000], timeout=240)
        assert last.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, last.state_reason
        assert last.exposed == 30
        assert last.device_states.get("ACTIVE", 0) == 30
    finally:
        client.close()
        fleet.stop()


def test_watch_rollout_pushes_each_command_without_a_poll(
    tmp_path: Path, unpolled_stack: DevStack
) -> None:
    client = Client.connect(unpolled_stack.server, unpolled_stack.admin_token)
    try:
        publish(client, unpolled_stack, tmp_path, "1.0.0")
        created = client.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="lane-assist",
                version="1.0.0",
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            ),
            metadata=client.metadata,
        )
        updates = client.rollouts.WatchRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
            metadata=client.metadata,
            timeout=240,
        )
        first = next(updates)
        assert first.rollout.state == rollout_pb2.ROLLOUT_STATE_DRAFT
        request = rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id)
        client.rollouts.StartRollout(request, metadata=client.metadata)
        actions: list[str] = []
        for update in updates:
            actions += [e.action for e in update.events]
            if "advance" in actions:  # the engine's stage entry, woken by the start
                break
        assert actions[0] == "start"
        client.rollouts.PauseRollout(request, metadata=client.metadata)
        for update in updates:
            if update.rollout.state == rollout_pb2.ROLLOUT_STATE_PAUSED:
                assert "pause" in [e.action for e in update.events]
                break
        updates.cancel()
    finally:
        client.close()


def _statuses(stack: DevStack) -> tuple[grpc.Channel, Iterator[health_pb2.HealthCheckResponse]]:
    channel = grpc.insecure_channel(stack.server)
    stream = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service=""), timeout=240
    )
    return channel, (r.status for r in stream)


def test_health_follows_the_broker_link_and_turns_not_serving_on_stop(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    if broker.process is None:
        pytest.skip("the broker runs in a container: this test stops and starts its process")
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker))
    channel, statuses = _statuses(stack)
    try:
        assert next(statuses) == SERVING
        broker.process.stop()
        assert next(statuses) == NOT_SERVING
        broker.process.start()  # same port: the link reconnects by itself
        assert next(statuses) == SERVING
        stopping = threading.Thread(target=stack.control_plane.stop)
        stopping.start()
        # Before the server stops: a balancer hears it first, calls in flight finish.
        assert next(statuses) == NOT_SERVING
        stopping.join(timeout=60)
        assert not stopping.is_alive()
    finally:
        channel.close()
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
def test_health_is_not_serving_while_the_database_refuses_connections(
    tmp_path: Path, broker: BrokerHandle, postgres_url: str, postgres_database: str
) -> None:
    admin_url = str(make_url(postgres_url).set(drivername="postgresql+psycopg"))
    database = make_url(postgres_database).database
    assert database is not None
    stack = DevStack.start(
        tmp_path / "stack", broker=endpoint(broker), database_url=postgres_database
    )
    channel, statuses = _statuses(stack)
    try:
        assert next(statuses) == SERVING
        _set_connections(admin_url, database, allowed=False)
        try:
            assert next(statuses) == NOT_SERVING
        finally:
            _set_connections(admin_url, database, allowed=True)
        assert next(statuses) == SERVING
    finally:
        channel.close()
        stack.stop()


REPLICA_B = "ota-replica-b"


@pytest.mark.postgres
def test_another_replicas_command_wakes_this_replicas_engine_and_watch(
    tmp_path: Path, postgres_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(BOUNDS, "engine_interval_seconds", Bound(0.01, HOUR, "seconds"))
    monkeypatch.setitem(BOUNDS, "publish_poll_seconds", Bound(0.05, HOUR, "seconds"))
    monkeypatch.setattr(rollouts_api, "WATCH_POLL_SECONDS", HOUR)
    unpolled = {"engine_interval_seconds": HOUR, "publish_poll_seconds": HOUR}
    settings = BrokerSettings(port=0, extra_control_usernames=(REPLICA_B,))
    with private_broker(tmp_path / "broker", settings=settings) as broker:
        secret_b = broker.add_user(REPLICA_B)
        # One state directory: the same keys, bundle files and admin token for both.
        a = DevStack.start(
            tmp_path / "stack",
            broker=endpoint(broker),
            database_url=postgres_database,
            config_overrides=unpolled,
        )
        b: DevStack | None = None
        client_a: Client | None = None
        client_b: Client | None = None
        try:
            wait_for(a.control_plane.lease.held, what="replica A holding the engine lease")
            b = DevStack.start(
                tmp_path / "stack",
                broker=endpoint(broker),
                database_url=postgres_database,
                config_overrides={
                    **unpolled,
                    "mqtt_username": REPLICA_B,
                    "mqtt_password": secret_b,
                },
            )
            assert not b.control_plane.lease.held()
            client_a = Client.connect(a.server, a.admin_token)
            client_b = Client.connect(b.server, b.admin_token)
            publish(client_b, b, tmp_path, "1.0.0")
            created = client_b.rollouts.CreateRollout(
                rollout_pb2.CreateRolloutRequest(
                    feature="lane-assist",
                    version="1.0.0",
                    stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
                ),
                metadata=client_b.metadata,
            )
            updates = client_a.rollouts.WatchRollout(
                rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
                metadata=client_a.metadata,
                timeout=240,
            )
            assert next(updates).rollout.state == rollout_pb2.ROLLOUT_STATE_DRAFT
            # Served by B, which does not hold the lease: only A's engine may act on it,
            # and only B's notice can wake it (and A's watch) before an hour is up.
            client_b.rollouts.StartRollout(
                rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
                metadata=client_b.metadata,
            )
            actions: list[str] = []
            for update in updates:
                actions += [e.action for e in update.events]
                if "advance" in actions:
                    break
            assert actions[0] == "start"
            updates.cancel()
        finally:
            for client in (client_a, client_b):
                if client is not None:
                    client.close()
            if b is not None:
                b.control_plane.stop()
            a.stop()
