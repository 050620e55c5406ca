"""Every RPC against every kind of caller, on a real server: the authorisation matrix.

The methods come from the server's own reflection, so a method added to a
service without a line in METHOD_ROLES fails here instead of being quietly
denied (or, worse, allowed) in production.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ota.api.auth import ADMIN, DEVICE, METHOD_ROLES, OPEN_METHODS, RELEASE, VIEWER
from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import bundle_pb2, fleet_pb2, rollout_pb2, token_pb2

pytestmark = pytest.mark.e2e

DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass(frozen=True)
class Rpc:
    path: str  # "/ota.v1.Service/Method"
    client_streaming: bool
    server_streaming: bool


def _served_methods(channel: grpc.Channel) -> list[Rpc]:
    """Every ota method that takes a bearer token (all but `OPEN_METHODS`)."""
    return [rpc for rpc in _all_methods(channel) if rpc.path not in OPEN_METHODS]


def _open_methods(channel: grpc.Channel) -> list[Rpc]:
    return sorted(
        (rpc for rpc in _all_methods(channel) if rpc.path in OPEN_METHODS), key=lambda r: r.path
    )


def _all_methods(channel: grpc.Channel) -> list[Rpc]:
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    found = []
    for service_name in database.get_services():
        if not service_name.startswith("ota."):
            continue
        service = pool.FindServiceByName(service_name)
        for m in service.methods:
            found.append(
                Rpc(f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
            )
    return found


def _call(
    channel: grpc.Channel, rpc: Rpc, token: str | None, payload: bytes = b""
) -> grpc.StatusCode:
    """Call with raw bytes (b"" is the empty request of any method); the status it ends with."""
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    timeout = 20.0
    try:
        if rpc.client_streaming and rpc.server_streaming:
            for _ in channel.stream_stream(rpc.path)(
                iter([payload]), metadata=metadata, timeout=timeout
            ):
                break
        elif rpc.client_streaming:
            channel.stream_unary(rpc.path)(iter([payload]), metadata=metadata, timeout=timeout)
        elif rpc.server_streaming:
            for _ in channel.unary_stream(rpc.path)(payload, metadata=metadata, timeout=timeout):
                break
        else:
            channel.unary_unary(rpc.path)(payload, metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK


@pytest.fixture
def channel(stack: DevStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.server) as ch:
        yield ch


@dataclass(frozen=True)
class Callers:
    tokens: dict[str, str]  # role -> a live token of that role
    device_token: str
    other_device: str


def _callers(stack: DevStack) -> Callers:
    admin = Client.connect(stack.server, stack.admin_token)
    try:
        creds = admin.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=d, model="ev6", region="eu", firmware="4.2"
                    )
                    for d in ("car-a", "car-b")
                ]
            ),
            metadata=admin.metadata,
        ).credentials
        tokens = {ADMIN: stack.admin_token}
        for role in (RELEASE, VIEWER):
            tokens[role] = admin.tokens.CreateToken(
                token_pb2.CreateTokenRequest(
                    token=token_pb2.Token(display_name=f"ci-{role}", role=role)
                ),
                metadata=admin.metadata,
            ).secret
    finally:
        admin.close()
    secret_a = next(c.secret for c in creds if c.device_id == "car-a")
    return Callers(tokens, f"device:car-a:{secret_a}", "car-b")


def test_every_served_method_has_a_rule_and_every_rule_a_method(channel: grpc.Channel) -> None:
    served = {rpc.path for rpc in _served_methods(channel)} | {
        rpc.path for rpc in _open_methods(channel)
    }
    assert len(served) >= 33
    assert served == set(METHOD_ROLES) | OPEN_METHODS


def test_an_open_method_lets_no_bearer_token_stand_for_its_own_check(
    stack: DevStack, channel: grpc.Channel
) -> None:
    """EnrollDevice takes no bearer token: its one-time enrollment token decides,
    so neither an operator's token nor none at all gets an empty request through."""
    callers = _callers(stack)
    methods = _open_methods(channel)
    assert [rpc.path for rpc in methods] == sorted(OPEN_METHODS)
    for rpc in methods:
        for token in (None, "", *callers.tokens.values(), callers.device_token):
            code = _call(channel, rpc, token)
            refused = (
                *DENIED,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert code in refused, (rpc.path, code)


def test_every_method_refuses_every_caller_it_does_not_allow(
    stack: DevStack, channel: grpc.Channel
) -> None:
    callers = _callers(stack)
    methods = _served_methods(channel)
    assert methods
    for rpc in methods:
        allowed = METHOD_ROLES[rpc.path]
        where = rpc.path
        assert _call(channel, rpc, None) == grpc.StatusCode.UNAUTHENTICATED, where
        assert _call(channel, rpc, "") == grpc.StatusCode.UNAUTHENTICATED, where
        assert _call(channel, rpc, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED, where
        assert _call(channel, rpc, "ota_" + "0" * 64) == grpc.StatusCode.UNAUTHENTICATED, where
        assert _call(channel, rpc, "device:car-a:wrong") == grpc.StatusCode.UNAUTHENTICATED, where
        for role, token in callers.tokens.items():
            code = _call(channel, rpc, token)
            if role in allowed:
                # An empty request is refused for what it is, never for who sent it.
                assert code not in DENIED, (where, role, code)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (where, role, code)
        # A device asks for itself where a method is per device.
        own = bundle_pb2.GetDesiredStateRequest(device_id="car-a").SerializeToString()
        payload = own if rpc.path.endswith("/GetDesiredState") else b""
        code = _call(channel, rpc, callers.device_token, payload)
        if DEVICE in allowed:
            assert code not in DENIED, (where, DEVICE, code)
        else:
            # Operator methods are closed to devices.
            assert code == grpc.StatusCode.PERMISSION_DENIED, (where, DEVICE, code)


def test_a_device_cannot_read_another_devices_state(stack: DevStack, channel: grpc.Channel) -> None:
    callers = _callers(stack)
    device_methods = [rpc for rpc in _served_methods(channel) if DEVICE in METHOD_ROLES[rpc.path]]
    per_device = [rpc for rpc in device_methods if rpc.path.endswith("/GetDesiredState")]
    assert per_device
    for rpc in per_device:
        other = bundle_pb2.GetDesiredStateRequest(device_id=callers.other_device)
        mine = bundle_pb2.GetDesiredStateRequest(device_id="car-a")
        assert (
            _call(channel, rpc, callers.device_token, other.SerializeToString())
            == grpc.StatusCode.PERMISSION_DENIED
        )
        # The same device for itself gets past authorisation.
        assert _call(channel, rpc, callers.device_token, mine.SerializeToString()) not in DENIED
        # An unknown device is refused the same way as an existing one.
        ghost = bundle_pb2.GetDesiredStateRequest(device_id="no-such-car")
        assert (
            _call(channel, rpc, callers.device_token, ghost.SerializeToString())
            == grpc.StatusCode.PERMISSION_DENIED
        )


def test_a_revoked_token_is_refused_everywhere_at_once(
    stack: DevStack, channel: grpc.Channel
) -> None:
    admin = Client.connect(stack.server, stack.admin_token)
    try:
        created = admin.tokens.CreateToken(
            token_pb2.CreateTokenRequest(token=token_pb2.Token(display_name="doomed", role=ADMIN)),
            metadata=admin.metadata,
        )
        doomed = Client.connect(stack.server, created.secret)
        doomed.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), metadata=doomed.metadata)
        admin.tokens.RevokeToken(
            token_pb2.RevokeTokenRequest(name=created.token.name), metadata=admin.metadata
        )
        doomed.close()
    finally:
        admin.close()
    for rpc in _served_methods(channel):
        assert _call(channel, rpc, created.secret) == grpc.StatusCode.UNAUTHENTICATED, rpc.path


def test_tokens_cli_creates_lists_and_revokes(
    stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", stack.server, "--token", stack.admin_token, "--format", "json"]
    assert ota_main(["tokens", "create", "--role", "viewer", "--name", "dashboards", *base]) == 0
    created = json.loads(capsys.readouterr().out)
    secret = created["secret"]
    token_id = created["token"]["token_id"]
    assert secret.startswith("ota_") and len(secret) > 60
    viewer = ["--server", stack.server, "--token", secret, "--format", "json"]
    assert ota_main(["rollout", "list", *viewer]) == 0
    capsys.readouterr()
    # A viewer may not mint tokens: one clean line, non-zero exit.
    assert ota_main(["tokens", "create", "--role", "admin", "--name", "x", *viewer]) == 1
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert ota_main(["tokens", "list", *base]) == 0
    listed = json.loads(capsys.readouterr().out)["tokens"]
    mine = next(t for t in listed if t["token_id"] == token_id)
    assert mine["display_name"] == "dashboards" and mine["role"] == "viewer"
    assert mine["revoked"] is False and "last_use_time" in mine
    assert secret not in json.dumps(listed)
    assert ota_main(["tokens", "revoke", token_id, *base]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"] is True
    assert ota_main(["rollout", "list", *viewer]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert ota_main(["tokens", "list", "--active", *base]) == 0
    assert token_id not in capsys.readouterr().out
    assert ota_main(["tokens", "revoke", "nope", *base]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    # The config token is still the bootstrap admin.
    assert ota_main(["tokens", "list", *base]) == 0
