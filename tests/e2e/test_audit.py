"""The audit log of every object over a real control plane: who, what, when, from where."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.signing.keys import generate_key
from ota.signing.rootgen import RootChange
from ota.v1 import fleet_pb2, rollout_pb2, token_pb2, webhook_pb2
from tests.e2e.scenario import MODELS, publish

pytestmark = pytest.mark.e2e


def _audit(capsys: pytest.CaptureFixture[str], stack: DevStack, *args: str) -> list[dict[str, str]]:
    capsys.readouterr()
    base = ["--server", stack.server, "--token", stack.admin_token, "--format", "json"]
    assert ota_main(["audit", *args, *base]) == 0
    entries: list[dict[str, str]] = json.loads(capsys.readouterr().out)["entries"]
    return entries


def test_every_object_change_is_audited_with_who_when_and_where(
    stack: DevStack,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ota.audit")
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=d, model=MODELS[0], region="eu", firmware="4.2.0"
                    )
                    for d in ("car-1", "car-2")
                ]
            ),
            metadata=client.metadata,
        )
        client.fleet.RevokeDevice(
            fleet_pb2.RevokeDeviceRequest(device_id="car-2"), metadata=client.metadata
        )
        token = client.tokens.CreateToken(
            token_pb2.CreateTokenRequest(token=token_pb2.Token(display_name="ci", role="release")),
            metadata=client.metadata,
        ).token
        client.tokens.RevokeToken(
            token_pb2.RevokeTokenRequest(name=token.name), metadata=client.metadata
        )
        hook = client.webhooks.CreateWebhook(
            webhook_pb2.CreateWebhookRequest(
                webhook=webhook_pb2.Webhook(
                    url="https://hooks.example.com/ota", event_types=["keys.rotated"]
                )
            ),
            metadata=client.metadata,
        ).webhook
        client.webhooks.DeleteWebhook(
            webhook_pb2.DeleteWebhookRequest(name=hook.name), metadata=client.metadata
        )
        new_root = tmp_path / "root-2.pem"
        plan = client.plan_root_rotation(
            RootChange(root_keys=[generate_key(new_root)]),
            root_keys=[stack.keys.root_key, new_root],
        )
        assert client.rotate_root(plan).root_version == 2
        created = client.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="lane-assist",
                version="1.0.0",
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            ),
            metadata=client.metadata,
        )
    finally:
        client.close()

    everything = _audit(capsys, stack)
    seen = {(e["object_type"], e["object_id"], e["action"]) for e in everything}
    assert {
        ("bundle", "bundles/lane-assist/1.0.0", "publish"),
        ("device", "car-1", "register"),
        ("device", "car-2", "register"),
        ("device", "car-2", "revoke"),
        ("token", token.token_id, "create"),
        ("token", token.token_id, "revoke"),
        ("webhook", hook.webhook_id, "add"),
        ("webhook", hook.webhook_id, "remove"),
        ("keys", "root", "rotate"),
        ("rollout", created.rollout_id, "create"),
    } <= seen
    asked = [e for e in everything if e["actor"] == "admin"]
    assert len(asked) >= 10
    assert all(e["address"].startswith(("ipv4:127.0.0.1:", "ipv6:")) for e in asked)
    times = [e["time"] for e in everything]
    assert times == sorted(times, reverse=True)  # newest first

    # Filters: a kind, one object, an actor, a time.
    assert {e["object_type"] for e in _audit(capsys, stack, "--object", "token")} == {"token"}
    car = _audit(capsys, stack, "--object", "device/car-2")
    assert [e["action"] for e in car] == ["revoke", "register"]
    assert _audit(capsys, stack, "--actor", "nobody") == []
    assert len(_audit(capsys, stack, "--since", "1h")) == len(everything)
    assert _audit(capsys, stack, "--since", "2999-01-01T00:00") == []
    paged = _audit(capsys, stack, "--limit", "3")
    assert paged == everything[:3]

    # Each one logged at INFO once committed.
    lines = [r.getMessage() for r in caplog.records if r.name == "ota.audit"]
    for expected in (
        "audit: bundle bundles/lane-assist/1.0.0 publish by admin from ipv",
        "audit: 2 device(s) registered (car-1, car-2) by admin",
        "audit: device car-2 revoke by admin",
        f"audit: token {token.token_id} create by admin",
        f"audit: webhook {hook.webhook_id} remove by admin",
        "audit: keys root rotate by admin",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, lines)

    # Mistakes: one line, non-zero exit.
    capsys.readouterr()
    base = ["--server", stack.server, "--token", stack.admin_token]
    assert ota_main(["audit", "--object", "planet", *base]) == 1
    assert "object_type" in capsys.readouterr().err
    assert ota_main(["audit", "--since", "yesterday", *base]) == 1
    assert "--since" in capsys.readouterr().err
