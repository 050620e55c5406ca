"""Plans as code on the simulated fleet: approval stages, holdouts, the kill switch,
maintenance windows, the dry run and the CLI around them, with exact counts."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.clock import ManualClock
from ota.devstack import DevStack
from ota.domain.bucketing import is_control
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import (
    MODELS,
    REGIONS,
    command,
    create_from_plan,
    get_rollout,
    publish,
    report,
    report_states,
    start_fleet,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _active(client: Client, rollout_id: str) -> int:
    return report_states(report(client, rollout_id)).get("ACTIVE", 0)


def test_an_approval_stage_waits_until_promoted_and_holdouts_are_never_exposed(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 40)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\nholdout: 25%\n"
            "cohort: {name: internal, devices: [sim-000000, sim-000001, sim-000002],"
            " advance: approval}\n"
            "stages: [{exposure: 100%}]\n",
        )
        preview = client.rollouts.PlanRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id), metadata=client.metadata
        )
        salt = bytes.fromhex(created.salt_hex)
        control = {d.device_id for d in fleet.devices if is_control(salt, d.device_id, 250_000)}
        cohort = {"sim-000000", "sim-000001", "sim-000002"} - control
        assert {e.reason: e.devices for e in preview.excluded} == {
            "not_eligible": 0,
            "incompatible": 0,
            "holdout": len(control),
        }
        assert [(s.exposed, s.new) for s in preview.stages] == [
            (len(cohort), len(cohort)),
            (40 - len(control), 40 - len(control) - len(cohort)),
        ]

        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: get_rollout(client, created.rollout_id).phase == "awaiting_approval",
            what="the cohort stage to await approval",
        )
        assert _active(client, created.rollout_id) == len(cohort)
        # It stays at the cohort until someone approves.
        assert get_rollout(client, created.rollout_id).exposed == len(cohort)
        promoted = command(client, "Promote", created.rollout_id)
        assert promoted.state == rollout_pb2.ROLLOUT_STATE_RUNNING
        wait_for(
            lambda: (
                get_rollout(client, created.rollout_id).state == rollout_pb2.ROLLOUT_STATE_COMPLETED
            ),
            what="completion after approval",
        )
        assert dict(fleet.outcomes(created.rollout_id)) == {"ACTIVE": 40 - len(control)}
        holdout_devices = [d for d in fleet.devices if d.device_id in control]
        assert holdout_devices and all("lane-assist" not in d.installed for d in holdout_devices)
    finally:
        client.close()
        fleet.stop()


def test_the_kill_switch_deactivates_every_device_within_seconds(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 30)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\n"
            "stages: [{exposure: 50%, min_soak: 1h}, {exposure: 100%}]\n",
        )
        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: (
                _active(client, created.rollout_id)
                == get_rollout(client, created.rollout_id).exposed
                > 0
            ),
            what="stage 1 active",
        )
        exposed = get_rollout(client, created.rollout_id).exposed
        killed = command(client, "Kill", created.rollout_id)
        assert killed.state == rollout_pb2.ROLLOUT_STATE_KILLED
        wait_for(
            lambda: dict(fleet.outcomes(created.rollout_id)) == {"DEACTIVATED": exposed},
            what="every exposed device to deactivate the feature",
            timeout=10,
        )
        on = [d for d in fleet.devices if d.installed.get("lane-assist") is not None]
        assert len(on) == exposed and not any(d.installed["lane-assist"].active for d in on)
        history = client.rollouts.ListRolloutEvents(
            rollout_pb2.ListRolloutEventsRequest(rollout_id=created.rollout_id),
            metadata=client.metadata,
        ).events
        assert history[-1].action == "kill" and history[-1].actor == "admin"
        assert '"state": ["RUNNING", "KILLED"]' in history[-1].diff_json
    finally:
        client.close()
        fleet.stop()


def test_a_maintenance_window_defers_exposure(tmp_path: Path, broker: BrokerHandle) -> None:
    # The window opens 30 minutes after "now"; the test moves the control plane's clock.
    start = datetime.now(UTC).replace(second=0, microsecond=0)
    clock = ManualClock(start)
    opens, closes = start + timedelta(minutes=30), start + timedelta(minutes=90)
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker), clock=clock)
    fleet = start_fleet(stack, tmp_path, 20)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        days = sorted({opens.strftime("%a").lower(), closes.strftime("%a").lower()})
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\n"
            f"maintenance_windows: [{{days: [{', '.join(days)}], start: '{opens:%H:%M}', "
            f"end: '{closes:%H:%M}'}}]\n"
            "stages: [{exposure: 100%}]\n",
        )
        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: get_rollout(client, created.rollout_id).phase == "deferred",
            what="exposure deferred outside the window",
        )
        assert get_rollout(client, created.rollout_id).exposed == 0
        assert not fleet.outcomes(created.rollout_id)
        clock.set(opens + timedelta(minutes=1))
        wait_for(
            lambda: (
                get_rollout(client, created.rollout_id).state == rollout_pb2.ROLLOUT_STATE_COMPLETED
            ),
            what="exposure once the window opened",
        )
        assert dict(fleet.outcomes(created.rollout_id)) == {"ACTIVE": 20}
    finally:
        client.close()
        fleet.stop()
        stack.stop()


def _ota(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ota.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": stack.admin_token},
        timeout=60,
        check=False,
    )


def test_plans_as_code_from_the_command_line(stack: DevStack, tmp_path: Path) -> None:
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
    finally:
        client.close()
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "feature: lane-assist\nversion: 1.0.0\nstages: [{exposure: 10%}, {exposure: 5%}]\n"
    )
    refused = _ota(stack, "rollout", "create", "--plan", str(bad))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "ota: error: stages[1].exposure: exposure must not decrease: 5% after 10%"
    ]
    plan = tmp_path / "plan.json"
    plan.write_text(
        '{"feature": "lane-assist", "version": "1.0.0", "holdout": "10%",'
        ' "stages": [{"exposure": "10%", "advance": "approval"}, {"exposure": "100%"}]}'
    )
    created = _ota(stack, "rollout", "create", "--plan", str(plan), "--format", "json")
    assert created.returncode == 0, created.stderr
    rollout_id = created.stdout.split('"rollout_id": "')[1].split('"')[0]
    dry = _ota(stack, "rollout", "plan", rollout_id)
    assert dry.returncode == 0, dry.stderr
    assert "holdout" in dry.stdout and "not_eligible" in dry.stdout
    edit = tmp_path / "edit.yaml"
    edit.write_text(
        "feature: lane-assist\nversion: 1.0.0\nholdout: 10%\n"
        "stages: [{exposure: 10%, advance: approval}, {exposure: 50%}, {exposure: 100%}]\n"
    )
    edited = _ota(stack, "rollout", "edit", rollout_id, "--plan", str(edit), "--reason", "slower")
    assert edited.returncode == 0, edited.stderr
    assert "plan v2" in edited.stdout
    history = _ota(stack, "rollout", "history", rollout_id, "--format", "json")
    assert '"action": "edit"' in history.stdout and '"reason": "slower"' in history.stdout


def test_post_activation_crashes_trip_a_rollback(stack: DevStack, tmp_path: Path) -> None:
    # Every ev9 crashes on start (one device in three): the crash gate rolls back.
    fleet = SimulatedFleet(
        compose_fleet(30, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse([]),
            crash_rates={"ev9": 1.0},
        ),
    )
    fleet.start()
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        created = create_from_plan(
            client,
            "feature: lane-assist\nversion: 1.0.0\n"
            "stages: [{exposure: 50%, min_soak: 1h}, {exposure: 100%}]\n"
            "gates: [{metric: crash_rate, max: 10%, min_sample: 6, action: rollback}]\n",
        )
        command(client, "Start", created.rollout_id)
        wait_for(
            lambda: (
                get_rollout(client, created.rollout_id).state
                == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
            ),
            what="the crash gate to roll back",
        )
        rolled = get_rollout(client, created.rollout_id)
        assert rolled.current_stage == 0
        assert "crash-rate gate tripped" in rolled.state_reason
        wait_for(
            lambda: dict(fleet.outcomes(created.rollout_id)) == {"ROLLED_BACK": rolled.exposed},
            what="every exposed device reverted",
        )
    finally:
        client.close()
        fleet.stop()
