"""No device takes a control plane's broker account name: registration and start refuse it.

A device id is its broker username, so a device named `ota-control` would
overwrite the control plane's password in the broker's password file, and
a certificate naming it would sign in with the control plane's rights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from ota.app import ControlPlane, claim_control_account
from ota.client import Client
from ota.clock import SystemClock
from ota.devstack import DevStack
from ota.errors import InvalidArgument
from ota.v1 import fleet_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint

pytestmark = pytest.mark.e2e


def _register(client: Client, device_id: str) -> None:
    client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=device_id, model="ev6", region="eu", firmware="1.0.0"
                )
            ]
        ),
        metadata=client.metadata,
    )


def _refused(client: Client, device_id: str) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        _register(client, device_id)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(refused.value.details())


def test_device_ids_in_a_control_accounts_namespace_are_refused(
    tmp_path: Path, broker: BrokerHandle, database_url: str
) -> None:
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker), database_url=database_url)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        control = stack.control_plane.config.mqtt_username
        for name in (control, f"{control}-publish-2", f"{control}-ingest-1"):
            details = _refused(client, name)
            assert details.startswith("devices[0].device_id: "), details
            assert f"{name!r} is reserved" in details
        # Names that only look alike are devices like any other.
        for name in (f"{control}x", f"car-{control}"):
            _register(client, name)

        # Another replica that started on this database claims its name for good.
        claim_control_account(stack.control_plane.store, "ota-replica-b", SystemClock())
        assert "'ota-replica-b' and ota-replica-b-* are" in _refused(
            client, "ota-replica-b-publish-3"
        )

        # The CLI: one line naming the field, exit 1, nothing registered.
        env = {**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": stack.admin_token}
        cli = subprocess.run(
            [
                *(sys.executable, "-m", "ota.cli.main", "fleet", "register"),
                *(f"{control}-ingest-9", "--model", "ev6", "--region", "eu", "--firmware", "1.0"),
            ],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert cli.returncode == 1, cli.stderr
        assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
        assert "device_id" in cli.stderr and "reserved" in cli.stderr
        listed = client.fleet.ListDevices(fleet_pb2.ListDevicesRequest(), metadata=client.metadata)
        ids = {d.device_id for d in listed.devices}
        assert ids == {f"{control}x", f"car-{control}"}

        # A control plane whose username a registered device already holds does not start.
        _register(client, "edge-7")
        with pytest.raises(InvalidArgument) as refused_start:
            ControlPlane.build(replace(stack.control_plane.config, mqtt_username="edge"))
        assert refused_start.value.field == "mqtt_username"
        assert "edge-7" in str(refused_start.value)
    finally:
        client.close()
        stack.stop()
