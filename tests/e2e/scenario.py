"""Helpers for end-to-end scenarios: a simulated fleet, bundles, waiting on outcomes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import report_pb2, rollout_pb2

MODELS = ["ev6", "ev9", "niro"]
REGIONS = ["eu", "us"]


def start_fleet(
    stack: DevStack,
    tmp_path: Path,
    count: int,
    *,
    failures: list[str] | None = None,
    trusted_root: bytes | None = None,
) -> SimulatedFleet:
    fleet = SimulatedFleet(
        compose_fleet(count, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=trusted_root or stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse(failures or []),
        ),
    )
    fleet.start()
    return fleet


def publish(
    client: Client, stack: DevStack, tmp_path: Path, version: str, size: int = 10_000
) -> str:
    path = tmp_path / f"bundle-{version}.bin"
    path.write_bytes(bytes((i * 7 + len(version)) % 251 for i in range(size)))
    bundle = client.publish_bundle(
        path,
        feature="lane-assist",
        version=version,
        models=MODELS,
        min_firmware="4.0",
        keys=[stack.keys.release_key],
    )
    return bundle.sha256.hex()


def run_rollout(
    client: Client,
    version: str,
    stages_ppm: list[int],
    *,
    action: int = rollout_pb2.GATE_ACTION_PAUSE,
    timeout: float = 120.0,
) -> rollout_pb2.Rollout:
    """Create and start a rollout; return it once it reaches a final or paused state."""
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version=version,
            stages=[rollout_pb2.Stage(ppm=p, min_soak_seconds=0) for p in stages_ppm],
            gate=rollout_pb2.FailureGate(max_failure_ppm=50_000, min_sample=5, action=action),
        ),
        metadata=client.metadata,
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id), metadata=client.metadata
    )
    stop_states = {
        rollout_pb2.ROLLOUT_STATE_COMPLETED,
        rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
        rollout_pb2.ROLLOUT_STATE_ABORTED,
        rollout_pb2.ROLLOUT_STATE_PAUSED,
    }
    last = created
    for update in client.rollouts.WatchRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
        metadata=client.metadata,
        timeout=timeout,
    ):
        last = update.rollout
        if last.state in stop_states:
            break
    return last


def report(client: Client, rollout_id: str) -> report_pb2.RolloutReport:
    result: report_pb2.RolloutReport = client.reports.GetRolloutReport(
        report_pb2.GetRolloutReportRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return result


def wait_for(condition: Callable[[], bool], *, what: str, timeout: float = 60.0) -> None:
    """Re-check an observable condition until it holds (events arrive asynchronously)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(0.1)


def report_states(r: report_pb2.RolloutReport) -> dict[str, int]:
    return {c.key: c.count for c in r.current_states if c.key != "TARGETED"}


def create_from_plan(client: Client, plan: str) -> rollout_pb2.Rollout:
    """CreateRollout from a plan document (YAML or JSON)."""
    r: rollout_pb2.Rollout = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(plan_document=plan), metadata=client.metadata
    )
    return r


def command(client: Client, verb: str, rollout_id: str) -> rollout_pb2.Rollout:
    """Run a rollout command by its RPC verb: Start, Pause, Promote, Kill, ..."""
    r: rollout_pb2.Rollout = getattr(client.rollouts, f"{verb}Rollout")(
        rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason=f"test {verb}"),
        metadata=client.metadata,
    )
    return r


def get_rollout(client: Client, rollout_id: str) -> rollout_pb2.Rollout:
    r: rollout_pb2.Rollout = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return r


def history(client: Client, rollout_id: str) -> list[rollout_pb2.RolloutEvent]:
    return list(
        client.rollouts.ListRolloutEvents(
            rollout_pb2.ListRolloutEventsRequest(rollout_id=rollout_id), metadata=client.metadata
        ).events
    )
