"""Two `ota serve` replicas on one PostgreSQL database: what one changes, the other shows.

Each replica answers GetRollout, and checks API tokens, from memory. The
replicas run with the longest caches the config allows (60 s, 300 s), longer
than any wait here, so only
the change notice (NOTIFY on commit, LISTEN on each replica) can make
replica B show promptly what a command through replica A did. The notice
connections are then cut from the server side: a replica that lost its
connection must not go on serving what it can no longer hear about. The
same notices carry token revocations: a token revoked through one replica
is refused by the other, which had it in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text

from ota.broker import BrokerSettings
from ota.client import Client
from ota.keyring import KeyPaths, generate_keyring
from ota.store.database import open_database
from ota.store.notices import APPLICATION_NAME
from ota.v1 import rollout_pb2, token_pb2
from tests.broker_harness import private_broker
from tests.e2e.processes import ControlPlaneProcess, listen_port, serve_config
from tests.e2e.scenario import MODELS, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

REPLICA_B = "ota-replica-b"
WAIT = 30.0  # well inside the 60 s an entry could otherwise be kept


@contextmanager
def _replicas(tmp_path: Path, database_url: str) -> Iterator[tuple[Client, Client, KeyPaths, str]]:
    """Clients of replicas A and B (as admin), the keys, and B's address."""
    settings = BrokerSettings(port=0, extra_control_usernames=(REPLICA_B,))
    with private_broker(tmp_path / "broker", settings=settings) as broker:
        secret_b = broker.add_user(REPLICA_B)
        keys = generate_keyring(tmp_path / "keys")
        token = os.urandom(24).hex()
        shared = {
            "database_url": database_url,
            "data_dir": str(tmp_path / "data"),
            "rollout_cache_seconds": 60.0,
            "token_cache_seconds": 300.0,
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
        clients: list[Client] = []
        try:
            a.start()
            b.start()
            clients = [Client.connect(a.server, token), Client.connect(b.server, token)]
            yield clients[0], clients[1], keys, b.server
        finally:
            for client in clients:
                client.close()
            a.stop()
            b.stop()


def _listeners(database_url: str) -> set[int]:
    """The backend pids of the replicas' notice connections that are listening."""
    engine = open_database(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE application_name = :name AND query LIKE 'LISTEN%'"
                ),
                {"name": APPLICATION_NAME},
            )
            return {int(pid) for (pid,) in rows}
    finally:
        engine.dispose()


def _cut(database_url: str, pids: set[int]) -> None:
    engine = open_database(database_url)
    try:
        with engine.connect() as conn:
            for pid in pids:
                conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        engine.dispose()


def _state(client: Client, rollout_id: str) -> rollout_pb2.RolloutState.ValueType | None:
    """The rollout's state as `client`'s replica answers it; None once it is NOT_FOUND."""
    try:
        r: rollout_pb2.Rollout = client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id),
            metadata=client.metadata,
            timeout=10,
        )
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise
    return r.state


def _command(client: Client, verb: str, rollout_id: str) -> None:
    """Run a command, again if it raced the engine (ABORTED asks the caller to retry)."""
    request = rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason="test")

    def landed() -> bool:
        try:
            getattr(client.rollouts, f"{verb}Rollout")(
                request, metadata=client.metadata, timeout=10
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                return False
            raise
        return True

    wait_for(landed, what=f"{verb} landing")


def test_a_command_through_one_replica_shows_on_the_other_at_once(
    tmp_path: Path, postgres_database: str
) -> None:
    with _replicas(tmp_path, postgres_database) as (a, b, keys, _b_server):
        wait_for(lambda: len(_listeners(postgres_database)) == 2, what="both replicas listening")
        bundle = tmp_path / "bundle.bin"
        bundle.write_bytes(bytes(i % 251 for i in range(4096)))
        a.publish_bundle(
            bundle,
            feature="wipers",
            version="1.0.0",
            models=MODELS,
            min_firmware="4.0",
            keys=[keys.release_key],
        )
        created = a.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="wipers",
                version="1.0.0",
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            ),
            metadata=a.metadata,
        )
        rid = created.rollout_id
        # B reads the draft (and keeps it), twice, so the second answer is its memory's.
        assert _state(b, rid) == rollout_pb2.ROLLOUT_STATE_DRAFT
        assert _state(b, rid) == rollout_pb2.ROLLOUT_STATE_DRAFT

        _command(a, "Start", rid)
        wait_for(
            lambda: _state(b, rid) == rollout_pb2.ROLLOUT_STATE_RUNNING,
            what="B showing the rollout A started",
            timeout=WAIT,
        )
        _command(b, "Pause", rid)  # and the other way round
        wait_for(
            lambda: _state(a, rid) == rollout_pb2.ROLLOUT_STATE_PAUSED,
            what="A showing the rollout B paused",
            timeout=WAIT,
        )

        # The notice connections are cut: each replica reconnects, and what was
        # committed while it could not hear is not served from its memory.
        before = _listeners(postgres_database)
        _cut(postgres_database, before)
        _command(a, "Abort", rid)
        wait_for(
            lambda: _state(b, rid) == rollout_pb2.ROLLOUT_STATE_ABORTED,
            what="B showing the abort committed while its notices were cut",
            timeout=WAIT,
        )
        wait_for(
            lambda: len(_listeners(postgres_database) - before) == 2,
            what="both replicas listening again",
        )
        assert _state(b, rid) == rollout_pb2.ROLLOUT_STATE_ABORTED

        # A deleted rollout is gone on every replica.
        draft = a.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="wipers", version="1.0.0", stages=[rollout_pb2.Stage(ppm=1_000_000)]
            ),
            metadata=a.metadata,
        ).rollout_id
        assert _state(b, draft) == rollout_pb2.ROLLOUT_STATE_DRAFT
        assert _state(b, draft) == rollout_pb2.ROLLOUT_STATE_DRAFT
        a.rollouts.DeleteRollout(
            rollout_pb2.DeleteRolloutRequest(rollout_id=draft, reason="test"),
            metadata=a.metadata,
            timeout=10,
        )
        wait_for(
            lambda: _state(b, draft) is None, what="B refusing the deleted rollout", timeout=WAIT
        )
        assert _state(a, draft) is None


def _lists(client: Client) -> grpc.StatusCode:
    try:
        client.rollouts.ListRollouts(
            rollout_pb2.ListRolloutsRequest(), metadata=client.metadata, timeout=10
        )
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def test_a_token_revoked_through_one_replica_is_refused_by_the_other(
    tmp_path: Path, postgres_database: str
) -> None:
    with _replicas(tmp_path, postgres_database) as (a, _b, _keys, b_server):
        wait_for(lambda: len(_listeners(postgres_database)) == 2, what="both replicas listening")
        created = a.tokens.CreateToken(
            token_pb2.CreateTokenRequest(token=token_pb2.Token(display_name="dash", role="viewer")),
            metadata=a.metadata,
        )
        viewer = Client.connect(b_server, created.secret)
        try:
            assert _lists(viewer) == grpc.StatusCode.OK  # B verifies it, and keeps it
            assert _lists(viewer) == grpc.StatusCode.OK
            a.tokens.RevokeToken(
                token_pb2.RevokeTokenRequest(name=created.token.name), metadata=a.metadata
            )
            wait_for(
                lambda: _lists(viewer) == grpc.StatusCode.UNAUTHENTICATED,
                what="B refusing the token A revoked",
                timeout=WAIT,
            )
        finally:
            viewer.close()
