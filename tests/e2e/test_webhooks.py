"""Webhooks over a real `ota serve`, a real broker, SQLite and a real HTTP receiver.

The receiver fails, drops connections, answers slowly, hangs past the
delivery deadline and recovers; an endpoint that is down is parked in the
dead-letter list and redelivered; the control plane is SIGKILLed while events
are committed but not yet delivered. Every time: each event arrives with a
valid signature, at least once, and a rollout's events in the order they
happened.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.keyring import KeyPaths, generate_keyring
from ota.signing.keys import generate_key
from ota.signing.rootgen import RootChange
from ota.v1 import bundle_pb2, rollout_pb2, webhook_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.processes import (
    ControlPlaneProcess,
    listen_port,
    serve_config,
    start_promoted_rollout,
)
from tests.e2e.scenario import wait_for
from tests.webhook_receiver import Received, first_arrivals, receiving, verify_all

pytestmark = pytest.mark.e2e

# What operators do to one rollout below, and the events it must announce.
JOURNEY = ["pause", "resume", "promote", "abort", "rollback", "kill"]
JOURNEY_EVENTS = [
    "rollout.created",
    "rollout.started",
    "rollout.stage_advanced",
    "rollout.paused",
    "rollout.resumed",
    "rollout.stage_advanced",
    "rollout.aborted",
    "rollout.rolled_back",
    "rollout.killed",
]


TROUBLE = ["fail", "close", "hang", "fail", "slow"]


def _serve(
    tmp_path: Path, broker: BrokerHandle, keys: KeyPaths, token: str, **overrides: Any
) -> ControlPlaneProcess:
    port = listen_port()
    config = serve_config(
        tmp_path / "ota.toml",
        broker,
        keys,
        f"127.0.0.1:{port}",
        token,
        webhook_allow_http=True,
        lease_duration_seconds=3.0,
        lease_renew_seconds=0.5,
        **overrides,
    )
    return ControlPlaneProcess(config, f"127.0.0.1:{port}", token, tmp_path / "ota.log")


def _add(client: Client, url: str, **fields: Any) -> webhook_pb2.CreateWebhookResponse:
    response: webhook_pb2.CreateWebhookResponse = client.webhooks.CreateWebhook(
        webhook_pb2.CreateWebhookRequest(webhook=webhook_pb2.Webhook(url=url, **fields)),
        metadata=client.metadata,
    )
    return response


def _command(client: Client, command: str, rollout_id: str) -> None:
    method = getattr(client.rollouts, f"{command.capitalize()}Rollout")
    method(
        rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason=f"test {command}"),
        metadata=client.metadata,
    )


def _stage(client: Client, rollout_id: str) -> int:
    r: rollout_pb2.Rollout = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return r.current_stage


def _journey(client: Client, keys: KeyPaths, tmp_path: Path) -> str:
    """A rollout of no devices taken through every operator command; returns its id."""
    rollout_id = start_promoted_rollout(client, keys, tmp_path, [100_000, 1_000_000])
    wait_for(lambda: _stage(client, rollout_id) == 0, what="the engine entering stage 1")
    for command in JOURNEY:
        _command(client, command, rollout_id)
        if command == "promote":
            wait_for(lambda: _stage(client, rollout_id) == 1, what="stage 2 entered")
    return rollout_id


def _rollout_events(requests: list[Received], rollout_id: str) -> list[str]:
    return [
        r.payload["type"]
        for r in first_arrivals(requests)
        if r.payload["data"].get("rollout_id") == rollout_id
    ]


def _cli(capsys: pytest.CaptureFixture[str], server: str, token: str, *args: str) -> str:
    capsys.readouterr()
    code = ota_main([*args, "--server", server, "--token", token])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_deliveries_survive_a_receiver_that_fails_hangs_and_recovers(
    tmp_path: Path, broker: BrokerHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    token = os.urandom(24).hex()
    server = _serve(
        tmp_path,
        broker,
        keys,
        token,
        webhook_timeout_seconds=2.0,
        webhook_retry_base_seconds=0.2,
        webhook_retry_max_seconds=1.0,
        webhook_max_attempts=6,
    )
    down_port = listen_port()  # nothing listens here until the redelivery
    with receiving(slow_seconds=0.5) as receiver:
        # The first event meets every kind of trouble before it gets through.
        receiver.script(*TROUBLE)
        server.start()
        try:
            client = Client.connect(server.server, token)
            good = _add(client, receiver.url, description="chat relay")
            assert good.secret.startswith("whsec_")
            down = _add(
                client,
                f"http://127.0.0.1:{down_port}/ota",
                event_types=["rollout.killed", "bundle.published"],
            )
            rollout_id = _journey(client, keys, tmp_path)

            wait_for(
                lambda: _rollout_events(receiver.snapshot(), rollout_id) == JOURNEY_EVENTS,
                what="every event of the rollout, in order",
                timeout=120,
            )
            requests = receiver.snapshot()
            verify_all(requests, good.secret)
            # The bundle published before the rollout existed came too (its own queue).
            assert "bundle.published" in {r.payload["type"] for r in requests}
            # Every misbehaviour was met, and each event it hit came again and got through.
            assert sorted(r.answered for r in requests if r.answered != "ok") == sorted(TROUBLE)
            for i, r in enumerate(requests):
                if r.answered in ("fail", "close", "hang"):
                    later = [x.answered for x in requests[i + 1 :] if x.event_id == r.event_id]
                    assert later and later[-1] in ("ok", "slow"), (r.answered, later)
                    # Each attempt is signed anew, at its own time.
                    assert all(x.headers["webhook-signature"] for x in requests[i:])
            last = first_arrivals(requests)[-1].payload
            assert last["data"]["stage"] == 2 and last["data"]["stages"] == 2
            assert last["data"]["actor"] == "admin"

            # The endpoint that was down: both of its events end in the dead-letter list.
            def dead() -> int:
                listed = client.webhooks.ListDeliveries(
                    webhook_pb2.ListDeliveriesRequest(name=down.webhook.name, states=["dead"]),
                    metadata=client.metadata,
                )
                return len(listed.deliveries)

            wait_for(lambda: dead() == 2, what="two deliveries parked as dead", timeout=90)
            out = _cli(
                capsys,
                server.server,
                token,
                "webhooks",
                "deliveries",
                down.webhook.webhook_id,
                "--format",
                "json",
            )
            parked = json.loads(out)["deliveries"]
            assert {d["state"] for d in parked} == {"dead"}
            assert all(d["attempts"] == 6 for d in parked)
            assert all("ConnectionRefusedError" in d["last_error"] for d in parked)

            # It comes back; redelivery sends both, signed with its own secret, in order.
            with receiving(down_port) as back:
                out = _cli(
                    capsys, server.server, token, "webhooks", "redeliver", down.webhook.webhook_id
                )
                assert "queued 2 dead deliveries again" in out
                wait_for(lambda: len(first_arrivals(back.snapshot())) == 2, what="redelivery")
                verify_all(back.snapshot(), down.secret)
                # Two queues (a bundle's, a rollout's): no order between them.
                assert sorted(r.payload["type"] for r in first_arrivals(back.snapshot())) == [
                    "bundle.published",
                    "rollout.killed",
                ]
                out = _cli(
                    capsys, server.server, token, "webhooks", "test", down.webhook.webhook_id
                )
                assert "delivered" in out
                assert back.snapshot()[-1].payload["type"] == "webhook.test"
                verify_all(back.snapshot(), down.secret)
            out = _cli(capsys, server.server, token, "webhooks", "list")
            assert good.webhook.webhook_id in out and down.webhook.webhook_id in out
            _cli(capsys, server.server, token, "webhooks", "remove", down.webhook.webhook_id)
            out = _cli(capsys, server.server, token, "webhooks", "list", "--format", "json")
            assert down.webhook.webhook_id not in out and good.webhook.webhook_id in out
        finally:
            server.stop()
    # What an operator reads in the log: the changes, the stages, the way it stopped.
    log = (tmp_path / "ota.log").read_text()
    for line in (
        "audit: bundle bundles/lane-assist/1.0.0 publish by admin from ipv4:127.0.0.1:",
        f"audit: webhook {down.webhook.webhook_id} add by admin",
        f"rollout {rollout_id} entering stage 2 of 2",
        "parked as dead after 6 attempts",
        "SIGTERM received: stopping the control plane",
        "control plane stopped",
    ):
        assert line in log, line


def _pending(database: Path) -> int:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT count(*) FROM webhook_delivery WHERE state = 'pending'").fetchone()
    return int(row[0])


def test_a_control_plane_killed_between_commit_and_delivery_loses_and_invents_nothing(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    token = os.urandom(24).hex()
    server = _serve(tmp_path, broker, keys, token, webhook_timeout_seconds=60.0)
    with receiving(hang_seconds=120) as receiver:
        # The first delivery hangs: the control plane dies with it in flight, and
        # with every later event committed and queued behind it.
        receiver.script("hang")
        server.start()
        try:
            client = Client.connect(server.server, token)
            # Rollout events only: one queue, so every event waits behind the first.
            hook = _add(client, receiver.url, event_types=sorted(set(JOURNEY_EVENTS)))
            rollout_id = _journey(client, keys, tmp_path)
            wait_for(lambda: len(receiver.snapshot()) == 1, what="the first delivery in flight")
            assert _pending(tmp_path / "ota.db") == len(JOURNEY_EVENTS)
            server.kill()
            receiver.release()  # from now on it answers at once
            assert len(receiver.snapshot()) == 1

            server.start()
            wait_for(
                lambda: _rollout_events(receiver.snapshot(), rollout_id) == JOURNEY_EVENTS,
                what="every event after the restart, in order",
                timeout=120,
            )
            wait_for(lambda: _pending(tmp_path / "ota.db") == 0, what="the outbox drained")
            requests = receiver.snapshot()
            verify_all(requests, hook.secret)
            ids = [r.event_id for r in requests]
            # At least once: the one in flight when it died came again; nothing else twice.
            assert ids[0] == ids[1]
            assert len(ids) == len(set(ids)) + 1 == 1 + len(JOURNEY_EVENTS)
            assert [r.payload["type"] for r in first_arrivals(requests)] == JOURNEY_EVENTS
        finally:
            server.stop()


def test_bundle_signing_discarding_and_key_rotation_are_announced(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    keys = generate_keyring(tmp_path / "stack" / "keys", release_keys=3, release_threshold=2)
    k1, k2, _ = keys.release_keys
    stack = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"webhook_allow_http": True, "webhook_retry_base_seconds": 0.2},
    )
    client = Client.connect(stack.server, stack.admin_token)
    try:
        with receiving() as receiver:
            hook = _add(client, receiver.url, feature="wipers")  # bundle events of one feature
            keyring_hook = _add(client, receiver.url, event_types=["keys.rotated"])

            def publish(version: str, *signers: Path) -> None:
                file = tmp_path / f"wipers-{version}.bin"
                file.write_bytes(version.encode() * 1000)
                client.publish_bundle(
                    file,
                    feature="wipers",
                    version=version,
                    models=["ev6"],
                    min_firmware="4.0",
                    keys=list(signers),
                )

            publish("1.0.0", k1)  # one of two: pending
            signing = client.review_pending("bundles/wipers/1.0.0")
            client.sign_bundle(signing, [k2])  # the second: published
            publish("1.1.0", k1)
            client.bundles.DiscardPendingBundle(
                bundle_pb2.DiscardPendingBundleRequest(name="bundles/wipers/1.1.0"),
                metadata=client.metadata,
            )
            new_root = tmp_path / "root-2.pem"
            plan = client.plan_root_rotation(
                RootChange(root_keys=[generate_key(new_root)]),
                root_keys=[keys.root_key, new_root],
            )
            assert client.rotate_root(plan).root_version == 2
            expected = [
                ("bundle.pending_signature", "bundles/wipers/1.0.0", 1),
                ("bundle.published", "bundles/wipers/1.0.0", 2),
                ("bundle.pending_signature", "bundles/wipers/1.1.0", 1),
                ("bundle.discarded", "bundles/wipers/1.1.0", 1),
            ]

            def bundle_events() -> list[tuple[str, str, int]]:
                return [
                    (r.payload["type"], r.payload["data"]["name"], r.payload["data"]["signatures"])
                    for r in first_arrivals(receiver.snapshot())
                    if r.payload["type"].startswith("bundle.")
                ]

            def rotated() -> bool:
                return any(
                    r.payload["type"] == "keys.rotated" for r in first_arrivals(receiver.snapshot())
                )

            # In order per bundle; the two bundles' queues go side by side.
            wait_for(
                lambda: sorted(bundle_events(), key=lambda e: e[1]) == expected and rotated(),
                what="every bundle event, in order per bundle",
            )
            by_hook: dict[str, list[Received]] = {hook.secret: [], keyring_hook.secret: []}
            for r in receiver.snapshot():
                kind = "keys" if r.payload["type"] == "keys.rotated" else "bundle"
                by_hook[keyring_hook.secret if kind == "keys" else hook.secret].append(r)
            verify_all(by_hook[hook.secret], hook.secret)
            verify_all(by_hook[keyring_hook.secret], keyring_hook.secret)
            published = next(
                r.payload["data"]
                for r in receiver.snapshot()
                if r.payload["type"] == "bundle.published"
            )
            assert published["signatures_required"] == 2 and published["actor"] == "admin"
            assert len(published["sha256"]) == 64  # hex, as everywhere people read hashes
            rotation = next(
                r.payload["data"]
                for r in receiver.snapshot()
                if r.payload["type"] == "keys.rotated"
            )
            assert rotation == {"root_version": 2}
    finally:
        client.close()
        stack.stop()
