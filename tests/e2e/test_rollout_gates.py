"""Gates and dynamic membership on the simulated fleet, with exact counts: crashes
versus the holdout roll back, a failing model pauses, a late device joins its stage.

Expected exposure is recomputed from the rollout's salt with `ota-bucket-v1`
(`is_exposed`, `is_control`), so every count is exact, not a tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, HealthProfile, compose_fleet
from ota.client import Client
from ota.devstack import DevStack
from ota.domain.bucketing import is_control, is_exposed
from ota.v1 import rollout_pb2
from tests.e2e.scenario import (
    MODELS,
    REGIONS,
    command,
    create_from_plan,
    get_rollout,
    history,
    publish,
    report,
    report_states,
    run_rollout,
    start_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e

HALF = 500_000
QUARTER = 250_000


def test_post_activation_crashes_versus_the_holdout_trip_a_rollback(
    stack: DevStack, tmp_path: Path
) -> None:
    # 2.0.0 crashes on every health sample; 1.0.0 (the baseline) never does. Every
    # online device samples its health every ~0.3 s, holdout devices included.
    fleet = SimulatedFleet(
        compose_fleet(40, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse([]),
            health=HealthProfile.parse(["*@2.0.0=1.0"]),
            health_interval=0.3,
        ),
    )
    fleet.start()
    client = Client.connect(stack.server, stack.admin_token)
    try:
        good = publish(client, stack, tmp_path, "1.0.0")
        baseline = run_rollout(client, "1.0.0", [1_000_000])
        assert baseline.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, baseline.state_reason
        wait_for(
            lambda: dict(fleet.outcomes(baseline.rollout_id)) == {"ACTIVE": 40},
            what="1.0.0 on every device",
        )
        publish(client, stack, tmp_path, "2.0.0", size=12_000)
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 2.0.0\nholdout: 25%\n"
            "stages: [{exposure: 50%, min_soak: 1h}, {exposure: 100%}]\n"
            "gates:\n"
            "  - {metric: crash_rate, max: 20%, min_sample: 10, versus_holdout: true,"
            " action: rollback}\n",
        )
        salt = bytes.fromhex(created.salt_hex)
        control = {d.device_id for d in fleet.devices if is_control(salt, d.device_id, QUARTER)}
        exposed = {
            d.device_id
            for d in fleet.devices
            if d.device_id not in control and is_exposed(salt, d.device_id, HALF)
        }
        assert control and exposed
        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: (
                get_rollout(client, created.rollout_id).state
                == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
            ),
            what="the crash gate versus the holdout to roll back",
            timeout=90,
        )
        rolled = get_rollout(client, created.rollout_id)
        assert rolled.current_stage == 0
        assert rolled.exposed == len(exposed)
        assert "crash-rate gate tripped" in rolled.state_reason
        assert "in the holdout (0.0%)" in rolled.state_reason

        # Every exposed device ends rolled back to 1.0.0; the holdout never saw 2.0.0.
        wait_for(
            lambda: dict(fleet.outcomes(created.rollout_id)) == {"ROLLED_BACK": len(exposed)},
            what="every exposed device reverted",
        )
        wait_for(
            lambda: (
                report_states(report(client, created.rollout_id)) == {"ROLLED_BACK": len(exposed)}
            ),
            what="the report to count every exposed device ROLLED_BACK",
        )
        reached = {d.device_id for d in fleet.devices if created.rollout_id in d.record.last_state}
        assert reached == exposed
        assert all(d.installed["lane-assist"].sha256.hex() == good for d in fleet.devices)
        assert all(
            d.record.periodic_samples.get("lane-assist@2.0.0", 0) == 0
            for d in fleet.devices
            if d.device_id in control
        )

        # The decision carries the figures: treatment against control, as rates.
        decision = next(e for e in history(client, created.rollout_id) if e.action == "rollback")
        assert decision.actor == "engine"
        assert decision.to_state == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
        figures = json.loads(decision.diff_json)["figures"]
        assert figures["metric"] == "crash_rate"
        assert figures["bad"] == figures["sample"] >= 10
        assert figures["rate_ppm"] == 1_000_000
        assert figures["control_bad"] == 0 and figures["control_sample"] >= 10
        assert figures["control_rate_ppm"] == 0
        assert figures["max_ppm"] == 200_000

        # The product manager's report shows the same comparison.
        health = report(client, created.rollout_id).health
        assert health.exposed.crashes >= figures["bad"] and health.exposed.unhealthy_ppm > 0
        assert health.control.name == "holdout" and health.control.samples >= 10
        assert health.control.crashes == 0 and health.control.unhealthy_ppm == 0
    finally:
        client.close()
        fleet.stop()


def test_a_failing_model_trips_the_install_gate_and_the_rollout_pauses(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 48, failures=["ev9@1.0.0=1.0"])
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\n"
            "stages: [{exposure: 50%, min_soak: 1h}, {exposure: 100%}]\n"
            "gates: [{metric: install_failure, max: 5%, min_sample: 5, action: pause}]\n",
        )
        salt = bytes.fromhex(created.salt_hex)
        exposed = [d for d in fleet.devices if is_exposed(salt, d.device_id, HALF)]
        failing = sum(d.profile.model == "ev9" for d in exposed)
        assert failing >= 1 and len(exposed) - failing >= 5
        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: (
                get_rollout(client, created.rollout_id).state == rollout_pb2.ROLLOUT_STATE_PAUSED
            ),
            what="the install gate to pause the rollout",
        )
        paused = get_rollout(client, created.rollout_id)
        assert paused.current_stage == 0
        assert paused.exposed == len(exposed)
        assert "install-failure gate tripped" in paused.state_reason

        # Paused, not rolled back: the stage's devices finish; nobody new is exposed.
        expected = {"ACTIVE": len(exposed) - failing, "FAILED": failing}
        wait_for(
            lambda: dict(fleet.outcomes(created.rollout_id)) == expected,
            what="the exposed devices to finish",
        )
        wait_for(
            lambda: report_states(report(client, created.rollout_id)) == expected,
            what="the report to count them",
        )
        assert dict(fleet.failure_reasons(created.rollout_id)) == {"INSTALL_FAILED": failing}
        assert {d.device_id for d in fleet.devices if "lane-assist" in d.installed} == {
            d.device_id for d in exposed if d.profile.model != "ev9"
        }
        after = get_rollout(client, created.rollout_id)
        assert after.state == rollout_pb2.ROLLOUT_STATE_PAUSED and after.exposed == len(exposed)

        decision = next(e for e in history(client, created.rollout_id) if e.action == "pause")
        assert decision.actor == "engine"
        figures = json.loads(decision.diff_json)["figures"]
        assert figures["metric"] == "install_failure"
        assert 1 <= figures["bad"] <= failing and figures["sample"] >= 5
        assert figures["bad"] * 1_000_000 > 50_000 * figures["sample"]
    finally:
        client.close()
        fleet.stop()


def test_a_device_registered_after_the_start_joins_the_stage_its_bucket_falls_in(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 24)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\nholdout: 20%\n"
            "stages: [{exposure: 50%, min_soak: 1h}, {exposure: 100%}]\n",
        )
        rid = created.rollout_id
        salt = bytes.fromhex(created.salt_hex)

        def at(ppm: int, ids: list[str]) -> set[str]:
            return {i for i in ids if not is_control(salt, i, 200_000) and is_exposed(salt, i, ppm)}

        first_ids = [d.device_id for d in fleet.devices]
        command(client, "Start", rid)
        wait_for(
            lambda: dict(fleet.outcomes(rid)) == {"ACTIVE": len(at(HALF, first_ids))},
            what="stage 1 active on the first fleet",
        )

        # Sixteen devices register mid-stage: those whose bucket is under 50 % join now.
        late = compose_fleet(16, models=MODELS, regions=REGIONS, firmware="4.2.0", prefix="late")
        fleet.add(late)
        late_ids = [p.device_id for p in late]
        joining = at(HALF, late_ids)
        assert joining
        all_ids = first_ids + late_ids
        wait_for(
            lambda: dict(fleet.outcomes(rid)) == {"ACTIVE": len(at(HALF, all_ids))},
            what="the late devices of stage 1 to install",
        )
        assert get_rollout(client, rid).exposed == len(at(HALF, all_ids))
        assert get_rollout(client, rid).current_stage == 0
        installed = {d.device_id for d in fleet.devices if "lane-assist" in d.installed}
        assert installed == at(HALF, all_ids)
        assert installed & set(late_ids) == joining

        # Promoted to 100 %: every device outside the holdout, late or not.
        command(client, "Promote", rid)
        wait_for(
            lambda: get_rollout(client, rid).state == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="completion after promotion",
        )
        everyone = at(1_000_000, all_ids)
        assert dict(fleet.outcomes(rid)) == {"ACTIVE": len(everyone)}
        assert {d.device_id for d in fleet.devices if "lane-assist" in d.installed} == everyone
        assert report_states(report(client, rid)) == {"ACTIVE": len(everyone)}
    finally:
        client.close()
        fleet.stop()
