"""GetRollout answers from memory, yet shows each device's progress as ingest stores it.

The control plane runs with the longest cache the config allows (60 s), so
a figure that moved only by ingest can show within the wait only because the
ingest transaction announced the rollout it changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import get_rollout, publish, start_fleet, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 12


@pytest.fixture
def cached_stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"rollout_cache_seconds": 60.0},
    )
    try:
        yield dev
    finally:
        dev.stop()


def test_progress_shows_as_devices_report_it(cached_stack: DevStack, tmp_path: Path) -> None:
    fleet = start_fleet(cached_stack, tmp_path, DEVICES)
    client = Client.connect(cached_stack.server, cached_stack.admin_token)
    try:
        publish(client, cached_stack, tmp_path, "1.0.0")
        created = client.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="lane-assist",
                version="1.0.0",
                # One stage that soaks for an hour: the engine has no decision to make
                # once every device is exposed; only ingest moves the figures.
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            ),
            metadata=client.metadata,
        )
        rid = created.rollout_id
        assert get_rollout(client, rid).state == rollout_pb2.ROLLOUT_STATE_DRAFT
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=rid), metadata=client.metadata
        )
        assert get_rollout(client, rid).state == rollout_pb2.ROLLOUT_STATE_RUNNING
        wait_for(
            lambda: dict(get_rollout(client, rid).device_states) == {"ACTIVE": DEVICES},
            what="every device ACTIVE in GetRollout",
            timeout=50,
        )
        final = get_rollout(client, rid)
        assert final.state == rollout_pb2.ROLLOUT_STATE_RUNNING
        assert final.exposed == DEVICES
        assert dict(fleet.outcomes(rid)) == {"ACTIVE": DEVICES}
    finally:
        client.close()
        fleet.stop()
