"""`ota demo`: a real staged rollout on a simulated fleet, then a faulty one rolled back.

Everything is real: a private Mosquitto, the control plane on SQLite, 1 200
simulated devices with their own MQTT connections verifying signatures and
downloading over gRPC. Nothing is left running afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.cli.report_render import render_table
from ota.cli.watch import watch_rollout
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import report_pb2, rollout_pb2

MODELS = ["ev6", "ev9", "niro"]
REGIONS = ["eu", "us"]
FAULTY_MODEL = "ev9"


def run_demo(*, devices: int, state_dir: Path | None) -> int:
    console = Console()
    own_dir = state_dir is None
    root = Path(tempfile.mkdtemp(prefix="ota-demo-")) if state_dir is None else state_dir
    started = time.monotonic()
    stack = fleet = None
    try:
        console.rule("ota demo")
        stack = DevStack.start(root / "stack", grpc_port=0)
        console.print(f"control plane {stack.server}  broker {stack.mqtt_url}  state {root}")
        profiles = compose_fleet(devices, models=MODELS, regions=REGIONS, firmware="4.2.0")
        fleet = SimulatedFleet(
            profiles,
            FleetSettings(
                server=stack.server,
                admin_token=stack.admin_token,
                trusted_root=stack.keys.root_json.read_bytes(),
                state_dir=root / "devices",
                # The 2.0.0 bundle fails to install on every ev9: the gate must catch it.
                failures=FailureProfile.parse([f"{FAULTY_MODEL}@2.0.0=1.0"]),
            ),
        )
        console.print(
            f"connecting {devices} simulated devices ({', '.join(MODELS)} in {', '.join(REGIONS)})…"
        )
        fleet.start()
        console.print(f"{devices} devices connected and subscribed")
        client = Client.connect(stack.server, stack.admin_token)
        ok = _healthy_rollout(console, client, stack, fleet, root)
        ok = _faulty_rollout(console, client, stack, fleet, root) and ok
        client.close()
        console.rule(f"demo finished in {time.monotonic() - started:.0f}s")
        return 0 if ok else 1
    finally:
        try:
            if fleet is not None:
                fleet.stop()
        finally:
            if stack is not None:
                stack.stop()
            if own_dir:
                shutil.rmtree(root, ignore_errors=True)


def _bundle(root: Path, name: str, size: int) -> Path:
    path = root / name
    path.write_bytes((name.encode() * (size // len(name) + 1))[:size])
    return path


def _run_rollout(
    console: Console,
    client: Client,
    *,
    version: str,
    on_breach: rollout_pb2.GateAction.ValueType,
) -> str:
    action = rollout_pb2.GateAction.Name(on_breach).removeprefix("GATE_ACTION_").lower()
    # The plan as a person writes it: every share with its unit.
    plan = (
        f"feature: lane-assist\nversion: {version}\n"
        "stages:\n"
        "  - {exposure: 1%, min_soak: 2s}\n"
        "  - {exposure: 10%, min_soak: 2s}\n"
        "  - {exposure: 100%, min_soak: 3s}\n"
        f"gates: [{{metric: install_failure, max: 5%, min_sample: 5, action: {action}}}]\n"
    )
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(plan_document=plan), metadata=client.metadata
    )
    rollout_id: str = created.rollout_id
    console.print(
        f"created rollout {rollout_id}: 1% → 10% → 100%, install-failure gate 5% ({action})"
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason="demo"),
        metadata=client.metadata,
    )
    watch_rollout(client, rollout_id, console=console)
    return rollout_id


def _settle(
    client: Client, fleet: SimulatedFleet, rollout_id: str, timeout: float = 120.0
) -> report_pb2.RolloutReport:
    """Wait until the report agrees with what the devices did (events still in flight)."""
    deadline = time.monotonic() + timeout
    done = threading.Event()
    while True:
        report = client.reports.GetRolloutReport(
            report_pb2.GetRolloutReportRequest(rollout_id=rollout_id), metadata=client.metadata
        )
        states = _report_states(report)
        # A rollback is settled once every exposed device has reported the revert.
        reverted = report.rollout.state != rollout_pb2.ROLLOUT_STATE_ROLLED_BACK or (
            states.get("ROLLED_BACK", 0) == report.exposed
        )
        if (reverted and states == dict(fleet.outcomes(rollout_id))) or time.monotonic() > deadline:
            return report
        done.wait(0.2)


def _report_states(report: report_pb2.RolloutReport) -> dict[str, int]:
    return {c.key: c.count for c in report.current_states if c.key != "TARGETED"}


def _check(console: Console, fleet: SimulatedFleet, report: report_pb2.RolloutReport) -> bool:
    rollout_id = report.rollout.rollout_id
    devices_did = dict(fleet.outcomes(rollout_id))
    reported = _report_states(report)
    if devices_did == reported:
        console.print(f"[green]✓ report matches what the devices did: {reported}[/green]")
        return True
    console.print(f"[red]✗ report {reported} != devices {devices_did}[/red]")
    return False


def _healthy_rollout(
    console: Console, client: Client, stack: DevStack, fleet: SimulatedFleet, root: Path
) -> bool:
    console.rule("1. lane-assist 1.0.0: a healthy staged rollout")
    bundle = client.publish_bundle(
        _bundle(root, "lane-assist-1.0.0.bin", 64 * 1024),
        feature="lane-assist",
        version="1.0.0",
        models=MODELS,
        min_firmware="4.0",
        keys=[stack.keys.release_key],
    )
    console.print(f"published {bundle.name}, signed by release key {bundle.signer_keyids[0][:12]}")
    rollout_id = _run_rollout(
        console, client, version="1.0.0", on_breach=rollout_pb2.GATE_ACTION_PAUSE
    )
    report = _settle(client, fleet, rollout_id)
    render_table(report, console)
    return (
        _check(console, fleet, report)
        and report.rollout.state == rollout_pb2.ROLLOUT_STATE_COMPLETED
    )


def _faulty_rollout(
    console: Console, client: Client, stack: DevStack, fleet: SimulatedFleet, root: Path
) -> bool:
    console.rule(f"2. lane-assist 2.0.0: fails on every {FAULTY_MODEL}, the gate rolls it back")
    bundle = client.publish_bundle(
        _bundle(root, "lane-assist-2.0.0.bin", 96 * 1024),
        feature="lane-assist",
        version="2.0.0",
        models=MODELS,
        min_firmware="4.0",
        keys=[stack.keys.release_key],
    )
    console.print(f"published {bundle.name}")
    rollout_id = _run_rollout(
        console, client, version="2.0.0", on_breach=rollout_pb2.GATE_ACTION_ROLLBACK
    )
    report = _settle(client, fleet, rollout_id)
    render_table(report, console)
    return (
        _check(console, fleet, report)
        and report.rollout.state == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
    )
