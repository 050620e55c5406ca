"""A scenario with misbehaving and churning devices against the real stack.

Compromised devices send garbage, oversized events, floods for rollouts that
do not exist, events in another device's name, events on another device's
topic and replays of their own events, all on their own credentials while
still running their honest firmware. The control plane counts each drop by
its reason, the broker refuses the foreign topic, and every device, the
misbehaving and the churning ones included, still completes the rollout.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile
from device_sim.scenario import parse_scenario
from ota.client import Client
from ota.devstack import DevStack
from ota.store.ingest import drop_counts
from ota.v1 import rollout_pb2
from tests.e2e.scenario import publish, report, report_states, run_rollout, wait_for

pytestmark = pytest.mark.e2e

SCENARIO = """
seed: 3
fleet:
  - {count: 6, model: ev6, region: eu, firmware: 4.2.0}
  - {count: 4, model: ev9, region: us, firmware: 4.2.0}
clock_skew:
  - {devices: sim-000008, seconds: 600}
latency:
  - {model: ev9, seconds: 0.05}
churn:
  - {region: us, fraction: 0.5, after: 0, offline: 1}
misbehaving:
  - {kind: garbage, count: 1, messages: 3}
  - {kind: oversized, devices: sim-000001, messages: 1}
  - {kind: flood, devices: sim-000002, messages: 40}
  - {kind: impersonate, devices: sim-000003, messages: 2}
  - {kind: foreign_topic, devices: sim-000004, messages: 2}
  - {kind: replay, devices: sim-000005, messages: 3}
"""

EXPECTED_DROPS = {"malformed": 3, "oversized": 1, "unknown_rollout": 40, "device_mismatch": 2}


@pytest.mark.timeout(300)
def test_misbehaving_devices_are_dropped_by_reason_and_every_device_still_completes(
    stack: DevStack, tmp_path: Path
) -> None:
    scenario = parse_scenario(yaml.safe_load(SCENARIO))
    fleet = SimulatedFleet(
        scenario.devices(),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile(),
            seed=scenario.seed,
            clock_skew=scenario.clock_skew_fn(),
            scenario=scenario,
        ),
    )
    fleet.start()
    client = Client.connect(stack.server, stack.admin_token)
    try:
        fleet.start_scenario()
        sent = {"garbage": 3, "oversized": 1, "flood": 40, "impersonate": 2, "replay": 3}
        wait_for(
            lambda: fleet.misbehaviour_counts() == {"sent": sent, "refused": {"foreign_topic": 2}},
            what="every misbehaving message to be sent (or refused by the broker)",
        )

        def drops() -> dict[str, int]:
            with stack.control_plane.store.transaction() as session:
                return drop_counts(session)

        wait_for(lambda: drops() == EXPECTED_DROPS, what=f"the drops {EXPECTED_DROPS}")

        publish(client, stack, tmp_path, "1.0.0")
        final = run_rollout(client, "1.0.0", [500_000, 1_000_000])
        assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
        assert dict(fleet.outcomes(final.rollout_id)) == {"ACTIVE": 10}
        assert report_states(report(client, final.rollout_id)) == {"ACTIVE": 10}
        # Nothing a misbehaving device sent counted as anything but a drop or a duplicate.
        assert drops() == EXPECTED_DROPS
        # The device whose topic was written to and the impersonated one ran as usual.
        assert fleet.device("sim-000005").record.last_state[final.rollout_id] == "ACTIVE"
        assert fleet.device("sim-000004").record.last_state[final.rollout_id] == "ACTIVE"
    finally:
        client.close()
        fleet.stop()
