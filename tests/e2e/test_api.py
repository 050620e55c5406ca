"""The gRPC surface: reflection, health, authentication, precise errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import bundle_pb2, fleet_pb2, rollout_pb2

pytestmark = pytest.mark.e2e


def test_reflection_lists_the_four_services_and_health(stack: DevStack) -> None:
    with grpc.insecure_channel(stack.server) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert {
        "ota.v1.BundleService",
        "ota.v1.RolloutService",
        "ota.v1.FleetService",
        "ota.v1.ReportService",
        "grpc.health.v1.Health",
    } <= services
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_callers_are_authenticated_and_devices_reach_only_their_own_state(stack: DevStack) -> None:
    admin = Client.connect(stack.server, stack.admin_token)
    creds = admin.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(device_id=d, model="ev6", region="eu", firmware="4.2")
                for d in ("car-a", "car-b")
            ]
        ),
        metadata=admin.metadata,
    ).credentials
    secret_a = next(c.secret for c in creds if c.device_id == "car-a")
    anonymous = Client.connect(stack.server, "")
    device_a = Client.connect(stack.server, f"device:car-a:{secret_a}")
    forged = Client.connect(stack.server, "device:car-a:not-the-secret")
    try:
        with pytest.raises(grpc.RpcError) as e:
            anonymous.rollouts.ListRollouts(
                rollout_pb2.ListRolloutsRequest(), metadata=anonymous.metadata
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            forged.bundles.GetMetadata(
                bundle_pb2.GetMetadataRequest(role="root"), metadata=forged.metadata
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            device_a.rollouts.CreateRollout(
                rollout_pb2.CreateRolloutRequest(feature="f", version="1"),
                metadata=device_a.metadata,
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:
            device_a.bundles.GetDesiredState(
                bundle_pb2.GetDesiredStateRequest(device_id="car-b"), metadata=device_a.metadata
            )
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        root = device_a.bundles.GetMetadata(
            bundle_pb2.GetMetadataRequest(role="root", version=1), metadata=device_a.metadata
        )
        assert root.content == stack.keys.root_json.read_bytes()
    finally:
        for c in (admin, anonymous, device_a, forged):
            c.close()


def test_bad_requests_get_precise_status_codes_naming_the_field(stack: DevStack) -> None:
    client = Client.connect(stack.server, stack.admin_token)
    try:
        cases = [
            (
                lambda: client.rollouts.GetRollout(
                    rollout_pb2.GetRolloutRequest(rollout_id="r-nope"), metadata=client.metadata
                ),
                grpc.StatusCode.NOT_FOUND,
                "rollout_id",
            ),
            (
                lambda: client.rollouts.CreateRollout(
                    rollout_pb2.CreateRolloutRequest(
                        feature="f",
                        version="1",
                        stages=[rollout_pb2.Stage(ppm=500_000), rollout_pb2.Stage(ppm=100_000)],
                    ),
                    metadata=client.metadata,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "stages[1].ppm",
            ),
            (
                lambda: client.fleet.ListDevices(
                    fleet_pb2.ListDevicesRequest(selector="colour = red"), metadata=client.metadata
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "selector",
            ),
            (
                lambda: client.fleet.ListDevices(
                    fleet_pb2.ListDevicesRequest(page_token="garbage!"), metadata=client.metadata
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_token",
            ),
            (
                lambda: client.fleet.ListDevices(
                    fleet_pb2.ListDevicesRequest(page_size=-1), metadata=client.metadata
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_size",
            ),
            (
                lambda: client.bundles.GetMetadata(
                    bundle_pb2.GetMetadataRequest(role="nonsense"), metadata=client.metadata
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "role",
            ),
        ]
        for call, code, field in cases:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code, e.value.details()
            assert field in (e.value.details() or "")
    finally:
        client.close()


def _ota(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ota.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_cli_reports_a_users_mistake_in_one_line_without_a_traceback(
    stack: DevStack, tmp_path: Path
) -> None:
    target = ["--server", stack.server, f"--token={stack.admin_token}"]
    missing = _ota("rollout", "status", "r-missing", *target)
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("ota: error: NOT_FOUND")
    assert "Traceback" not in missing.stderr

    no_key = _ota(
        "bundle",
        "publish",
        str(tmp_path / "none.bin"),
        "--feature",
        "f",
        "--version",
        "1.0",
        "--key",
        str(tmp_path / "none.pem"),
        *target,
    )
    assert no_key.returncode == 1 and "Traceback" not in no_key.stderr
    assert no_key.stderr.count("\n") == 1

    bundle = tmp_path / "ok.bin"
    bundle.write_bytes(b"feature bytes")
    published = _ota(
        "bundle",
        "publish",
        str(bundle),
        "--feature",
        "wipers",
        "--version",
        "1.0.0",
        "--model",
        "ev6",
        "--key",
        str(stack.keys.release_key),
        "--format",
        "json",
        *target,
    )
    assert published.returncode == 0, published.stderr
    assert '"name": "bundles/wipers/1.0.0"' in published.stdout
