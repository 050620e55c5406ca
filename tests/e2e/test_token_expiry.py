"""API tokens with a lifetime, over a real control plane and the CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import grpc
import pytest

from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import rollout_pb2
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    assert ota_main(list(args)) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def test_tokens_expire_by_default_unless_admin_and_expired_ones_are_refused(
    stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", stack.server, "--token", stack.admin_token, "--format", "json"]
    viewer: dict[str, object] = _json(
        capsys, "tokens", "create", "--role", "viewer", "--name", "dash", *base
    )
    token = viewer["token"]
    assert isinstance(token, dict)
    created = datetime.fromisoformat(token["create_time"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(token["expire_time"].replace("Z", "+00:00"))
    assert expires - created == timedelta(days=90)
    admin = _json(capsys, "tokens", "create", "--role", "admin", "--name", "ops", *base)
    assert isinstance(admin["token"], dict) and admin["token"]["expire_time"] is None
    month = _json(
        capsys,
        "tokens",
        "create",
        "--role",
        "release",
        "--name",
        "ci",
        "--expires-in",
        "30d",
        *base,
    )
    assert isinstance(month["token"], dict) and month["token"]["expire_time"] is not None

    short = _json(
        capsys,
        "tokens",
        "create",
        "--role",
        "viewer",
        "--name",
        "brief",
        "--expires-in",
        "1s",
        *base,
    )
    secret = str(short["secret"])
    client = Client.connect(stack.server, secret)
    refused: list[grpc.RpcError] = []

    def refused_as_expired() -> bool:
        try:
            client.rollouts.ListRollouts(
                rollout_pb2.ListRolloutsRequest(), metadata=client.metadata, timeout=10
            )
        except grpc.RpcError as exc:
            refused.append(exc)
            return True
        return False

    try:
        wait_for(refused_as_expired, what="the one-second token refused", timeout=60)
    finally:
        client.close()
    assert refused[-1].code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token expired" in str(refused[-1].details())

    # The CLI says so in one line; the list shows it expired, and --active leaves it out.
    capsys.readouterr()
    assert ota_main(["rollout", "list", "--server", stack.server, "--token", secret]) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "token expired" in err and "Traceback" not in err
    listed = _json(capsys, "tokens", "list", *base)["tokens"]
    assert isinstance(listed, list)
    brief = next(t for t in listed if t["display_name"] == "brief")
    assert brief["expired"] is True and brief["revoked"] is False
    active = _json(capsys, "tokens", "list", "--active", *base)["tokens"]
    assert isinstance(active, list)
    assert "brief" not in {t["display_name"] for t in active}
    assert {"dash", "ops", "ci"} <= {t["display_name"] for t in active}

    # Last use is shown once a token has been used.
    dash = Client.connect(stack.server, str(viewer["secret"]))
    try:
        dash.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), metadata=dash.metadata)
    finally:
        dash.close()
    listed = _json(capsys, "tokens", "list", *base)["tokens"]
    assert isinstance(listed, list)
    assert next(t for t in listed if t["display_name"] == "dash")["last_use_time"] is not None
    capsys.readouterr()
    assert ota_main(["tokens", "list", "--server", stack.server, "--token", stack.admin_token]) == 0
    table = capsys.readouterr().out
    assert "expires" in table and "never" in table

    # Mistakes: one clean line each.
    for bad, says in (("3x", "--expires-in"), ("0s", "ttl")):
        capsys.readouterr()
        args = ["tokens", "create", "--role", "viewer", "--name", "x", "--expires-in", bad]
        assert ota_main([*args, "--server", stack.server, "--token", stack.admin_token]) == 1
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
