"""A control-plane restart is invisible to a rollout's outcome.

`ota serve` runs as a child process on a private broker; it is SIGKILLed and
restarted while devices are downloading a bundle: three times at once, and
once kept down for a minute. Devices wait for it (they keep their place and
report nothing), so a rollout whose install-failure gate rolls back on the
very first failure still completes, with every count exact. `ota rollout
watch` reconnects across a restart and still exits 0 when the rollout completes.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.device.retry import RetryPolicy
from ota.keyring import KeyPaths, generate_keyring
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.e2e.processes import (
    ControlPlaneProcess,
    assert_rollout_converged,
    listen_port,
    serve_config,
    try_get_rollout,
    try_promote,
)
from tests.e2e.scenario import MODELS, REGIONS, report, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 300
# Four stages the test promotes by hand (an hour's soak each), so every kill finds a
# fresh stage of devices in the middle of their downloads; the last one needs no soak.
STAGES_PPM = [250_000, 500_000, 750_000, 1_000_000]
BUNDLE_BYTES = 2 * 1024 * 1024
OUTAGE_SECONDS = 60.0
# Actions the audit log may hold: no gate tripped, paused or rolled anything back.
CALM_ACTIONS = {"create", "start", "advance", "expose", "promote", "complete"}
PAST_DOWNLOAD = {"DOWNLOADED", "VERIFIED", "INSTALLING", "INSTALLED", "ACTIVE"}


@contextmanager
def control_plane(
    tmp_path: Path, broker: BrokerHandle, keys: KeyPaths, database_url: str
) -> Iterator[ControlPlaneProcess]:
    token = os.urandom(24).hex()
    server = f"127.0.0.1:{listen_port()}"
    plane = ControlPlaneProcess(
        serve_config(tmp_path / "ota.toml", broker, keys, server, token, database_url=database_url),
        server,
        token,
        tmp_path / "serve.log",
    )
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


def fleet_of(
    plane: ControlPlaneProcess, keys: KeyPaths, state_dir: Path, count: int
) -> SimulatedFleet:
    return SimulatedFleet(
        compose_fleet(count, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=plane.server,
            admin_token=plane.token,
            trusted_root=keys.root_json.read_bytes(),
            state_dir=state_dir,
            failures=FailureProfile.parse([]),
            # The default window (minutes) for an unreachable control plane; pauses of
            # at most 5 s so the fleet is back soon after the control plane is.
            retry=RetryPolicy(max_delay=5.0),
        ),
    )


def publish_and_create(client: Client, tmp_path: Path, keys: KeyPaths, size: int) -> str:
    """A bundle of `size` bytes and a DRAFT rollout that rolls back on the first failure."""
    bundle = tmp_path / "bundle.bin"
    bundle.write_bytes(os.urandom(size))
    client.publish_bundle(
        bundle,
        feature="lane-assist",
        version="1.0.0",
        models=MODELS,
        min_firmware="4.0",
        keys=[keys.release_key],
    )
    # Written with the protocol's own fields (ppm), not a plan document: the gate
    # allows 0 failures and judges from the first finished device.
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version="1.0.0",
            stages=[
                rollout_pb2.Stage(ppm=ppm, min_soak_seconds=0 if ppm == 1_000_000 else 3600)
                for ppm in STAGES_PPM
            ],
            gate=rollout_pb2.FailureGate(
                max_failure_ppm=0, min_sample=1, action=rollout_pb2.GATE_ACTION_ROLLBACK
            ),
        ),
        metadata=client.metadata,
    )
    return created.rollout_id


def states(fleet: SimulatedFleet, rollout_id: str) -> dict[str, int]:
    return dict(fleet.outcomes(rollout_id))


def assert_running(client: Client, rollout_id: str) -> rollout_pb2.Rollout:
    """The rollout, asserted RUNNING with no device FAILED (waits for a restarted server)."""
    answers: list[rollout_pb2.Rollout] = []

    def answered() -> bool:
        r = try_get_rollout(client, rollout_id)
        if r is not None:
            answers.append(r)
        return r is not None

    wait_for(answered, what="the control plane to answer", timeout=90)
    r = answers[-1]
    assert r.state == rollout_pb2.ROLLOUT_STATE_RUNNING, r.state_reason
    assert "FAILED" not in r.device_states, dict(r.device_states)
    return r


class RetryLog(logging.Handler):
    """Counts the devices' retries of an unreachable control plane, by what they fetched."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.downloads = 0
        self.metadata = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "(unreachable:" not in message:
            return
        if message.startswith("download of"):
            self.downloads += 1
        else:
            self.metadata += 1


@pytest.mark.timeout(540)
def test_a_rollout_rides_out_control_plane_kills_and_an_outage_while_devices_download(
    tmp_path: Path, broker: BrokerHandle, database_url: str
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    retries = RetryLog()
    retry_logger = logging.getLogger("ota.device.retry")
    retry_logger.addHandler(retries)
    level = retry_logger.level
    retry_logger.setLevel(logging.INFO)
    with control_plane(tmp_path, broker, keys, database_url) as plane:
        fleet = fleet_of(plane, keys, tmp_path / "devices", DEVICES)
        client = Client.connect(plane.server, plane.token)
        try:
            fleet.start()
            rollout_id = publish_and_create(client, tmp_path, keys, BUNDLE_BYTES)
            client.rollouts.StartRollout(
                rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id),
                metadata=client.metadata,
            )
            outage = threading.Event()
            for stage in range(len(STAGES_PPM)):

                def downloading(done_before: int) -> bool:
                    seen = states(fleet, rollout_id)
                    done = sum(n for state, n in seen.items() if state in PAST_DOWNLOAD)
                    # Bytes are flowing (a device of this stage has them all) and many
                    # devices are still in the middle of theirs.
                    return seen.get("DOWNLOADING", 0) >= 8 and done > done_before

                done_before = sum(
                    n for state, n in states(fleet, rollout_id).items() if state in PAST_DOWNLOAD
                )
                wait_for(
                    lambda done_before=done_before: downloading(done_before),
                    what=f"stage {stage + 1}'s downloads",
                    timeout=120,
                )
                before = retries.downloads + retries.metadata
                plane.kill()
                if stage == len(STAGES_PPM) - 1:
                    outage.wait(OUTAGE_SECONDS)  # the deliberate outage: nothing to wait on
                plane.start()
                # The kill cut transfers in flight: the devices waited, they did not fail.
                wait_for(
                    lambda before=before: retries.downloads + retries.metadata > before,
                    what="transfers cut by the kill to be retried",
                    timeout=60,
                )
                exposed = assert_running(client, rollout_id).exposed

                def stage_done(exposed: int = exposed) -> bool:
                    r = try_get_rollout(client, rollout_id)
                    return (
                        r is not None
                        and r.exposed == exposed
                        and dict(r.device_states) == {"ACTIVE": exposed}
                    )

                if stage < len(STAGES_PPM) - 1:
                    wait_for(stage_done, what=f"stage {stage + 1} to finish", timeout=240)
                    assert_running(client, rollout_id)
                    wait_for(
                        lambda stage=stage: try_promote(client, rollout_id) == stage,
                        what=f"stage {stage + 1} to be promoted",
                        timeout=60,
                    )

            def completed() -> bool:
                r = try_get_rollout(client, rollout_id)
                assert r is None or r.state in (
                    rollout_pb2.ROLLOUT_STATE_RUNNING,
                    rollout_pb2.ROLLOUT_STATE_COMPLETED,
                ), r.state_reason
                return r is not None and r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED

            wait_for(completed, what="the rollout to complete after the outage", timeout=300)

            assert_rollout_converged(client, fleet, rollout_id, DEVICES, len(STAGES_PPM))
            r = report(client, rollout_id)
            assert dict((c.key, c.count) for c in r.failures_by_reason) == {}
            assert r.stragglers.waiting_for_control_plane == 0
            actions = {
                e.action
                for e in client.rollouts.ListRolloutEvents(
                    rollout_pb2.ListRolloutEventsRequest(rollout_id=rollout_id),
                    metadata=client.metadata,
                ).events
            }
            assert actions <= CALM_ACTIONS, actions
            # Nobody gave up: the outage was well inside the devices' window.
            assert not any(d.record.gave_up for d in fleet.devices)
            assert not any(d.record.failed_reason for d in fleet.devices)
        finally:
            retry_logger.removeHandler(retries)
            retry_logger.setLevel(level)
            client.close()
            fleet.stop()
            gc.collect()


# -- ota rollout watch --------------------------------------------------------------------


class Watch:
    """`ota rollout watch --format json` as a child process; its lines, as they come."""

    def __init__(self, plane: ControlPlaneProcess, rollout_id: str, *extra: str) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ota.cli.main",
                "rollout",
                "watch",
                rollout_id,
                "--server",
                plane.server,
                "--token",
                plane.token,
                "--format",
                "json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.updates: list[dict[str, object]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, json_lines: bool) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._lock:
                if json_lines:
                    self.updates.append(json.loads(line))
                else:
                    self.errors.append(line.rstrip("\n"))

    def states(self) -> list[str]:
        with self._lock:
            return [str(u["rollout"]["state"]) for u in self.updates]  # type: ignore[index]

    def said(self, text: str) -> bool:
        with self._lock:
            return any(text in line for line in self.errors)

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def test_watch_keeps_streaming_across_a_restart_and_exits_0_on_completion(
    tmp_path: Path, broker: BrokerHandle, database_url: str
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    with control_plane(tmp_path, broker, keys, database_url) as plane:
        fleet = fleet_of(plane, keys, tmp_path / "devices", 20)
        client = Client.connect(plane.server, plane.token)
        watch: Watch | None = None
        try:
            fleet.start()
            rollout_id = publish_and_create(client, tmp_path, keys, 64 * 1024)
            watch = Watch(plane, rollout_id, "--reconnect-for", "3m")
            wait_for(lambda: watch.states() != [], what="the watch's first update", timeout=60)
            client.rollouts.StartRollout(
                rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id),
                metadata=client.metadata,
            )
            wait_for(
                lambda: "ROLLOUT_STATE_RUNNING" in watch.states(),
                what="the watch to see the start",
                timeout=60,
            )
            plane.kill()
            wait_for(
                lambda: watch.said("lost the control plane"),
                what="the watch to notice the control plane is gone",
                timeout=60,
            )
            assert watch.process.poll() is None  # still there, reconnecting
            plane.start()
            wait_for(lambda: watch.said("reconnected"), what="the watch to reconnect", timeout=90)
            # The rollout goes on after the restart, and the watch follows it to the end.
            for stage in range(len(STAGES_PPM) - 1):
                wait_for(
                    lambda stage=stage: try_promote(client, rollout_id) == stage,
                    what=f"stage {stage + 1} to be promoted",
                    timeout=120,
                )
            assert watch.finish(timeout=180) == 0, watch.errors
            assert watch.states()[-1] == "ROLLOUT_STATE_COMPLETED"
            # Each audit entry printed once, across the reconnection, and all of them.
            ids = [
                int(e["id"])  # type: ignore[index]
                for u in watch.updates
                for e in u.get("events", [])  # type: ignore[attr-defined]
            ]
            assert len(ids) == len(set(ids))
            audit = client.rollouts.ListRolloutEvents(
                rollout_pb2.ListRolloutEventsRequest(rollout_id=rollout_id),
                metadata=client.metadata,
            ).events
            assert sorted(ids) == [e.id for e in audit]
        finally:
            if watch is not None:
                watch.stop()
            client.close()
            fleet.stop()
            gc.collect()


def test_watch_gives_up_after_its_reconnect_time_with_one_line(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    keys = generate_keyring(tmp_path / "keys")
    with control_plane(tmp_path, broker, keys, f"sqlite:///{tmp_path / 'ota.db'}") as plane:
        client = Client.connect(plane.server, plane.token)
        try:
            rollout_id = publish_and_create(client, tmp_path, keys, 1024)
        finally:
            client.close()
        watch = Watch(plane, rollout_id, "--reconnect-for", "2s")
        try:
            wait_for(lambda: watch.states() != [], what="the watch's first update", timeout=60)
            plane.kill()
            assert watch.finish(timeout=120) == 1
            assert watch.errors[-1].startswith("ota: error: lost the control plane at "), (
                watch.errors
            )
            assert "could not reconnect for 2s" in watch.errors[-1]
            assert not any("Traceback" in line for line in watch.errors)
        finally:
            watch.stop()
