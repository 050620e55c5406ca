"""Devices refuse what no trusted key signed, and the report says why."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.signing.keys import generate_key
from ota.v1 import bundle_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import publish, report, run_rollout, start_fleet, wait_for

pytestmark = pytest.mark.e2e


def test_desired_state_signed_by_an_unknown_key_is_refused_and_counted(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    # A control plane whose director key is not the one the devices' root names:
    # what a stolen or impostor control plane would send.
    rogue = tmp_path / "rogue" / "director.pem"
    generate_key(rogue)
    stack = DevStack.start(
        tmp_path / "stack", broker=endpoint(broker), config_overrides={"director_key": rogue}
    )
    fleet = start_fleet(stack, tmp_path, 20)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        final = run_rollout(client, "1.0.0", [1_000_000], timeout=30)
        wait_for(
            lambda: sum(c.count for c in report(client, final.rollout_id).failures_by_reason) == 20,
            what="all 20 refusals to be reported",
        )
        r = report(client, final.rollout_id)
        assert {c.key: c.count for c in r.failures_by_reason} == {"SIGNATURE_INVALID": 20}
        assert dict(fleet.failure_reasons(final.rollout_id)) == {"SIGNATURE_INVALID": 20}
        assert all("lane-assist" not in d.installed for d in fleet.devices)
        assert all(d.trust.accepted_generation == 0 for d in fleet.devices)
    finally:
        client.close()
        fleet.stop()
        stack.stop()


def test_bundle_signed_by_an_unknown_release_key_is_refused_and_stays_invisible(
    stack: DevStack, tmp_path: Path
) -> None:
    client = Client.connect(stack.server, stack.admin_token)
    try:
        before = client.bundles.GetMetadata(
            bundle_pb2.GetMetadataRequest(role="targets"), metadata=client.metadata
        ).content
        impostor = tmp_path / "impostor.pem"
        generate_key(impostor)
        bundle = tmp_path / "b.bin"
        bundle.write_bytes(b"x" * 1000)
        with pytest.raises(grpc.RpcError) as refused:
            client.publish_bundle(
                bundle,
                feature="lane-assist",
                version="9.0.0",
                models=["ev6"],
                min_firmware="",
                keys=[impostor],
            )
        assert refused.value.code() in (
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        listed = client.bundles.ListBundles(
            bundle_pb2.ListBundlesRequest(), metadata=client.metadata
        )
        assert list(listed.bundles) == []
        after = client.bundles.GetMetadata(
            bundle_pb2.GetMetadataRequest(role="targets"), metadata=client.metadata
        ).content
        assert after == before
        assert json.loads(after)["signed"]["targets"] == {}
    finally:
        client.close()
