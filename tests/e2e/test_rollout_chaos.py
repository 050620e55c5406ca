"""Chaos: SIGKILL the control plane at random moments during one rollout of 500 devices.

`ota serve` runs as a child process on a private broker and a SQLite file; it
is killed at least 20 times and restarted each time. The rollout must still
complete with every device exposed exactly once, each stage entered once, and
an audit log whose transitions chain without a gap.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import random
import threading
import time
from pathlib import Path

import pytest

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.device.trust import RetryPolicy
from ota.keyring import generate_keyring
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.e2e.processes import (
    ControlPlaneProcess,
    listen_port,
    serve_config,
    start_promoted_rollout,
    try_get_rollout,
    try_promote,
)
from tests.e2e.scenario import MODELS, REGIONS, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 500
KILLS = 20
STAGES = [10_000, 50_000, 200_000, 500_000, 1_000_000]


def test_a_rollout_survives_twenty_sigkills_of_the_control_plane(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    token = os.urandom(24).hex()
    server = f"127.0.0.1:{listen_port()}"
    plane = ControlPlaneProcess(
        serve_config(tmp_path / "ota.toml", broker, keys, server, token),
        server,
        token,
        tmp_path / "serve.log",
    )
    plane.start()
    fleet = SimulatedFleet(
        compose_fleet(DEVICES, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=server,
            admin_token=token,
            trusted_root=keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse([]),
            # Patient devices: a download cut by a kill is retried past the restart.
            retry=RetryPolicy(attempts=30, first_delay=0.2, max_delay=2.0),
        ),
    )
    client = Client.connect(server, token)
    rng = random.Random(int(os.environ.get("OTA_CHAOS_SEED", "4")))
    kills = 0
    try:
        fleet.start()
        # Stages soak for an hour: the test promotes them itself, so the rollout cannot
        # finish before the control plane has been killed 20 times.
        rollout_id = start_promoted_rollout(client, keys, tmp_path, STAGES)
        pause = threading.Event()
        deadline = time.monotonic() + 600
        promoted: set[int] = set()
        while kills < KILLS:
            assert time.monotonic() < deadline, f"only {kills} kills before the deadline"
            current = try_get_rollout(client, rollout_id)
            assert current is not None
            assert current.state == rollout_pb2.ROLLOUT_STATE_RUNNING, (
                f"the rollout left RUNNING after {kills} kills ({current.state_reason}); "
                f"it must outlive {KILLS}"
            )
            # Every few kills, move on to the next stage, but never past the last one
            # while kills remain.
            stage = current.current_stage
            if kills % 3 == 2 and stage not in promoted and stage < len(STAGES) - 1:
                landed = try_promote(client, rollout_id)
                if landed is not None:
                    promoted.add(landed)
            pause.wait(rng.uniform(0.05, 1.2))  # a random moment, not a wait for a condition
            plane.kill()
            kills += 1
            plane.start()

        def finished() -> bool:
            r = try_get_rollout(client, rollout_id)
            if r is None:
                return False
            if r.state == rollout_pb2.ROLLOUT_STATE_RUNNING and r.current_stage not in promoted:
                landed = try_promote(client, rollout_id)
                if landed is not None:
                    promoted.add(landed)
            return r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED

        wait_for(finished, what="completion after the last restart", timeout=180)
        final = try_get_rollout(client, rollout_id)
        assert final is not None and final.exposed == DEVICES
        assert dict(final.device_states) == {"ACTIVE": DEVICES}
        assert dict(fleet.outcomes(rollout_id)) == {"ACTIVE": DEVICES}

        events = client.rollouts.ListRolloutEvents(
            rollout_pb2.ListRolloutEventsRequest(rollout_id=rollout_id), metadata=client.metadata
        ).events
        # Every device was notified as a new exposure exactly once, over all exposures.
        notified = [json.loads(e.diff_json)["notified"] for e in events if e.action == "expose"]
        assert sum(notified) == DEVICES
        # Each stage was entered exactly once, in order.
        assert [e.stage for e in events if e.action == "advance"] == list(range(len(STAGES)))
        # Transitions chain: each entry starts from the state the previous one left.
        for before, after in itertools.pairwise(events):
            assert after.id > before.id
            assert after.from_state == before.to_state, (before, after)
        assert [e.action for e in events][:2] == ["create", "start"]
        assert [e.action for e in events].count("complete") == 1
        assert events[-1].action == "complete"
        assert kills >= KILLS
    finally:
        client.close()
        fleet.stop()
        plane.stop()
        gc.collect()  # anything the fleet left behind complains here, not in a later test
