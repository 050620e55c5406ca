"""`ota serve` as a child process that a test may SIGKILL, and the config it runs on."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.device.trust import RetryPolicy
from ota.keyring import KeyPaths
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.e2e.scenario import MODELS, REGIONS, history, report, report_states


class ControlPlaneProcess:
    """`ota serve --config FILE` as a child process that the test may SIGKILL."""

    def __init__(self, config: Path, server: str, token: str, log: Path) -> None:
        self.config, self.server, self.token, self.log = config, server, token, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ota.cli.main", "-v", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        channel = grpc.insecure_channel(self.server)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
        finally:
            channel.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def serve_config(
    path: Path,
    broker: BrokerHandle,
    keys: KeyPaths,
    listen: str,
    token: str,
    **overrides: Any,
) -> Path:
    """Write an `ota serve` TOML config at `path`: a SQLite file next to it unless overridden."""
    pid_file = broker.files.pid_file if broker.process is not None else ""
    values: dict[str, Any] = {
        "listen": listen,
        "database_url": f"sqlite:///{path.parent / 'ota.db'}",
        "data_dir": str(path.parent / "data"),
        "mqtt_url": broker.url,
        "mqtt_username": broker.control_username,
        "mqtt_password": broker.control_password,
        "broker_password_file": str(broker.files.password_file),
        "broker_pid_file": str(pid_file),
        "root_file": str(keys.root_json),
        "initial_targets_file": str(keys.targets_json),
        "snapshot_key": str(keys.snapshot_key),
        "timestamp_key": str(keys.timestamp_key),
        "director_key": str(keys.director_key),
        "engine_interval_seconds": 0.1,
        **overrides,
    }
    lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    lines += ["", "[tokens]", f'{json.dumps(token)} = "admin"']
    path.write_text("\n".join(lines) + "\n")
    return path


def listen_port() -> int:
    """A free port below the ephemeral range, so no outgoing connection of the fleet can
    take it while the control plane is down (free_port() would pick an ephemeral one)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def try_get_rollout(client: Any, rollout_id: str) -> rollout_pb2.Rollout | None:
    """The rollout, or None while no control plane answers (between a kill and a restart).

    Waits for the client's channel to reconnect (it backs off after a kill, for up
    to 5 s), so a call right after a restart reaches the new process.
    """
    try:
        r: rollout_pb2.Rollout = client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id),
            metadata=client.metadata,
            timeout=10,
            wait_for_ready=True,
        )
    except grpc.RpcError:
        return None
    return r


def try_promote(client: Any, rollout_id: str) -> int | None:
    """Promote the current stage; returns its index, or None if the call did not land."""
    try:
        r: rollout_pb2.Rollout = client.rollouts.PromoteRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, reason="test: next stage"),
            metadata=client.metadata,
            timeout=10,
            wait_for_ready=True,
        )
    except grpc.RpcError:
        return None  # no control plane answered, or a race with the engine: retry later
    return r.current_stage


def patient_fleet(
    server: str,
    token: str,
    keys: KeyPaths,
    state_dir: Path,
    count: int,
    *,
    health_interval: float = 0.0,
) -> SimulatedFleet:
    """A fleet whose downloads, cut by a dying control plane, are retried past its restart."""
    return SimulatedFleet(
        compose_fleet(count, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=server,
            admin_token=token,
            trusted_root=keys.root_json.read_bytes(),
            state_dir=state_dir,
            failures=FailureProfile.parse([]),
            # Minutes of retries: an outage on a loaded machine must not look like a
            # download failure (and trip the install-failure gate).
            retry=RetryPolicy(attempts=120, first_delay=0.2, max_delay=2.0),
            health_interval=health_interval,
        ),
    )


def start_promoted_rollout(
    client: Client, keys: KeyPaths, tmp_path: Path, stages_ppm: list[int]
) -> str:
    """Publish a bundle and start a rollout whose stages advance only when promoted.

    Each stage soaks for an hour, so the test decides when the next one begins.
    """
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(bytes(i % 251 for i in range(10_000)))
    client.publish_bundle(
        bundle,
        feature="lane-assist",
        version="1.0.0",
        models=MODELS,
        min_firmware="4.0",
        keys=[keys.release_key],
    )
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version="1.0.0",
            stages=[rollout_pb2.Stage(ppm=p, min_soak_seconds=3600) for p in stages_ppm],
        ),
        metadata=client.metadata,
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
        metadata=client.metadata,
    )
    return created.rollout_id


def assert_rollout_converged(
    client: Client,
    fleet: SimulatedFleet,
    rollout_id: str,
    devices: int,
    stages: int,
) -> None:
    """Completed with exact counts: every device ACTIVE and exposed once, each stage entered
    once, and the report equal to what the devices did, every event counted once."""
    final = try_get_rollout(client, rollout_id)
    assert final is not None
    assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
    assert final.exposed == devices
    assert dict(final.device_states) == {"ACTIVE": devices}
    assert dict(fleet.outcomes(rollout_id)) == {"ACTIVE": devices}
    events = history(client, rollout_id)
    notified = [json.loads(e.diff_json)["notified"] for e in events if e.action == "expose"]
    assert sum(notified) == devices
    assert [e.stage for e in events if e.action == "advance"] == list(range(stages))
    assert [e.action for e in events].count("complete") == 1
    r = report(client, rollout_id)
    assert report_states(r) == {"ACTIVE": devices}
    sent = sum(d.record.events_by_rollout.get(rollout_id, 0) for d in fleet.devices)
    assert r.events_ingested == sent, f"{r.events_ingested} events ingested, {sent} sent"
