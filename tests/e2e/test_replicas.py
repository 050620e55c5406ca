"""Two `ota serve` replicas on one PostgreSQL database and one broker; the engine's holder dies.

Replica A holds the engine lease and drives a staged rollout of 300 devices;
replica B serves gRPC and ingests its share of events. A is SIGKILLed in the
middle of a stage: B takes the lease once it expires, advances the rollout
to its last stage, and after A is restarted (its broker session holds A's
share of the events) the rollout completes with exact counts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ota.broker import BrokerSettings
from ota.client import Client
from ota.keyring import generate_keyring
from ota.store import lease as lease_rows
from ota.store.database import open_database
from ota.store.session import Store
from ota.v1 import rollout_pb2
from tests.broker_harness import private_broker
from tests.e2e.processes import (
    ControlPlaneProcess,
    assert_rollout_converged,
    listen_port,
    patient_fleet,
    serve_config,
    start_promoted_rollout,
    try_get_rollout,
    try_promote,
)
from tests.e2e.scenario import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

DEVICES = 300
STAGES = [50_000, 300_000, 1_000_000]
REPLICA_B = "ota-replica-b"
LEASE_SECONDS = 3.0


def _holder(store: Store) -> str:
    with store.transaction() as session:
        row = lease_rows.current(session, "engine")
        return row.holder if row is not None else ""


def test_the_other_replica_takes_over_the_engine_when_the_holder_is_killed(
    tmp_path: Path, postgres_database: str
) -> None:
    settings = BrokerSettings(port=0, extra_control_usernames=(REPLICA_B,))
    with private_broker(tmp_path / "broker", settings=settings) as broker:
        secret_b = broker.add_user(REPLICA_B)
        keys = generate_keyring(tmp_path / "keys")
        token = os.urandom(24).hex()
        # Shared by the replicas: the database and the bundle files.
        shared = {
            "database_url": postgres_database,
            "data_dir": str(tmp_path / "data"),
            "lease_duration_seconds": LEASE_SECONDS,
            "lease_renew_seconds": 0.5,
            "publish_poll_seconds": 0.5,
        }
        port_a, port_b = listen_port(), listen_port()
        a = ControlPlaneProcess(
            serve_config(tmp_path / "a.toml", broker, keys, f"127.0.0.1:{port_a}", token, **shared),
            f"127.0.0.1:{port_a}",
            token,
            tmp_path / "a.log",
        )
        b = ControlPlaneProcess(
            serve_config(
                tmp_path / "b.toml",
                broker,
                keys,
                f"127.0.0.1:{port_b}",
                token,
                mqtt_username=REPLICA_B,
                mqtt_password=secret_b,
                **shared,
            ),
            f"127.0.0.1:{port_b}",
            token,
            tmp_path / "b.log",
        )
        # Devices and the operator reach whichever replica answers (gRPC pick-first).
        both = f"ipv4:127.0.0.1:{port_a},127.0.0.1:{port_b}"
        db = open_database(postgres_database)
        store = Store(db)
        fleet = patient_fleet(both, token, keys, tmp_path / "devices", DEVICES)
        client: Client | None = None
        try:
            a.start()
            wait_for(lambda: _holder(store) == broker.control_username, what="A holds the lease")
            b.start()
            fleet.start()
            client = Client.connect(both, token)
            rollout_id = start_promoted_rollout(client, keys, tmp_path, STAGES)

            def stage_done(index: int) -> bool:
                r = try_get_rollout(client, rollout_id)
                return (
                    r is not None
                    and r.current_stage == index
                    and r.exposed > 0
                    and dict(r.device_states) == {"ACTIVE": r.exposed}
                )

            wait_for(lambda: stage_done(0), what="the first stage installed", timeout=120)
            assert try_promote(client, rollout_id) == 0
            wait_for(
                lambda: (
                    (r := try_get_rollout(client, rollout_id)) is not None and r.current_stage == 1
                ),
                what="A's engine entering the second stage",
            )
            # Mid-stage: the second stage's devices are being notified and installing.
            a.kill()
            killed = time.monotonic()
            assert _holder(store) == broker.control_username
            wait_for(lambda: _holder(store) == REPLICA_B, what="B taking the lease", timeout=60)
            takeover = time.monotonic() - killed
            assert takeover >= LEASE_SECONDS * 0.5  # not before A's lease ran out

            promoted = {0}

            def promote_once(r: rollout_pb2.Rollout | None) -> None:
                if r is not None and r.current_stage not in promoted:
                    landed = try_promote(client, rollout_id)
                    if landed is not None:
                        promoted.add(landed)

            # B's engine drives now: it enters the last stage once promoted.
            def last_stage_entered() -> bool:
                r = try_get_rollout(client, rollout_id)
                promote_once(r)
                return r is not None and r.current_stage == 2

            wait_for(last_stage_entered, what="B's engine entering the last stage", timeout=120)

            # A's broker session kept A's share of the events; its restart delivers them.
            a.start()

            def completed() -> bool:
                r = try_get_rollout(client, rollout_id)
                promote_once(r)
                return r is not None and r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED

            wait_for(completed, what="the rollout completing", timeout=180)
            assert_rollout_converged(client, fleet, rollout_id, DEVICES, len(STAGES))
            # B kept the lease: the restarted A did not take it back.
            assert _holder(store) == REPLICA_B
            print(f"lease takeover {takeover:.1f}s after the SIGKILL")
        finally:
            if client is not None:
                client.close()
            fleet.stop()
            a.stop()
            b.stop()
            db.dispose()
