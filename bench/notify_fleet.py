"""notify-fleet: stage start -> signed desired state received and verified by every exposed device.

PROTOCOL §9: N = 10 000 in <= 2 s, against the same-run baseline "one retained
broadcast to the same N". A DevStack control plane runs in this process on a
private Mosquitto; the fleet is `ota-sim run --json --processes 2`, each
device on its own connection with its own credentials, verifying every
desired state with `ota.device.trust` as firmware does. Two simulator
processes, because each device's verification and the download it starts
next are CPU a real device brings along; one process holds one core.

Figure: from just before StartRollout (one stage, 100 %) until the fleet
reports every device holding the new generation, i.e. received and verified
(the simulator's status, printed every 20 ms, carries its wall-clock time;
both processes read the same clock). What the devices do next (download and
install) runs concurrently, as in a real rollout, and competes for the cores.

Baseline: the same device ids (re-registered, so with fresh secrets), each
connected and subscribed to its own `desired` topic, split over two child
processes as the fleet is; one control-plane-side client in this process
publishes one retained 200-byte message to each; first publish to last
delivery, on the wall clock every process reads. The ACL gives each device only its own topic, so a single
shared broadcast topic is not possible.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    MODELS,
    REGIONS,
    Figure,
    Result,
    Target,
    bench_stack,
    cpu_s,
    create_rollout,
    log,
    publish_bundle,
    ratio,
)
from bench.fleet_connect import ROOT, scratch_dir
from bench.mqtt_tools import broadcast_baseline_in_processes
from device_sim.fleet import provision
from device_sim.profile import compose_fleet
from ota.client import Client
from ota.transport.topics import Topics
from ota.v1 import rollout_pb2

NOTIFY_USER = "bench-notify"
TARGET_DEVICES = 10_000
TARGET_S = 2.0
STATUS_INTERVAL = 0.02
BUNDLE_BYTES = 4 * 1024


def run(
    quick: bool, *, devices: int | None = None, publish_connections: int | None = None
) -> Result:
    n = devices or (100 if quick else TARGET_DEVICES)
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-notify-", dir=scratch_dir()) as tmp,
        bench_stack(
            Path(tmp), extra_users=(NOTIFY_USER,), publish_connections=publish_connections
        ) as (stack, broker),
    ):
        client = Client.connect(stack.server, stack.admin_token)
        try:
            publish_bundle(
                client, stack, Path(tmp), feature="bench-notify", version="1.0.0", size=BUNDLE_BYTES
            )
            created = create_rollout(
                client, feature="bench-notify", version="1.0.0", stages_ppm=[1_000_000]
            )
            fleet = _Fleet(stack.server, stack.admin_token, stack.keys.root_json, Path(tmp), n)
            try:
                online = fleet.wait_online(timeout=max(120.0, n / 20))
                log(f"{n} devices online in {online['connect_s']:.2f} s (two simulator processes)")
                # Connected is not idle: each device still pulls its desired state over
                # gRPC, and a desired state published meanwhile waits behind that pull.
                # The clock starts on a fleet that follows its topics.
                settled_s = fleet.wait_following(n, timeout=max(120.0, n / 20))
                log(f"{n} devices following their desired-state topic {settled_s:.2f} s later")
                cpu0 = (cpu_s(), cpu_s(broker.process.pid))
                load0 = os.getloadavg()[0]
                publisher = stack.control_plane.publisher
                acked = _Acked(publisher.published + n, lambda: publisher.published)
                t0 = time.time()
                client.rollouts.StartRollout(
                    rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
                    metadata=client.metadata,
                )
                done_at, progress = fleet.wait_generation(n, t0, timeout=max(120.0, n / 10))
                notify_s = done_at - t0
                published_s = acked.at - t0 if acked.at else float("nan")
                cpu = {
                    "control_plane_s": cpu_s() - cpu0[0],
                    "broker_s": cpu_s(broker.process.pid) - cpu0[1],
                }
            finally:
                fleet.stop()
            log(
                f"the broker had acknowledged all {n} desired states {published_s:.2f} s after "
                f"StartRollout ({stack.control_plane.config.publish_connections} publishing "
                "connections)"
            )
            log(
                f"{n} devices verified the new desired state {notify_s:.2f} s after StartRollout "
                f"(half of them by {_percentile(progress, n, 0.5):.2f} s, 90 % by "
                f"{_percentile(progress, n, 0.9):.2f} s; load {load0:.1f})"
            )
            # The same device ids again, with fresh secrets (re-registering rotates them).
            secrets, _url, _root = provision(
                client.channel,
                stack.admin_token,
                compose_fleet(n, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            )
        finally:
            client.close()
        # The same layout as the fleet: receivers in two child processes.
        baseline = broadcast_baseline_in_processes(
            broker.host,
            broker.port,
            secrets,
            (NOTIFY_USER, broker.extra[NOTIFY_USER]),
            Topics(),
            timeout=max(120.0, n / 20),
            processes=2,
        )
        log(
            f"baseline: {n} retained publishes delivered in {baseline['notify_s']:.2f} s "
            f"(after connecting in {baseline['connect_s']:.2f} s)"
        )
    at_target = n >= TARGET_DEVICES
    return Result(
        name="notify-fleet",
        mode="quick" if quick else "full",
        figure=Figure(notify_s, "s", f"{n} devices: StartRollout to all verified"),
        baseline=Figure(baseline["notify_s"], "s", f"{n} retained publishes delivered"),
        ratio=ratio(notify_s, baseline["notify_s"]),
        targets=[
            Target(
                f"N = {TARGET_DEVICES} in <= {TARGET_S:g} s",
                notify_s <= TARGET_S if at_target else None,
                "" if at_target else f"measured {n} devices only",
            )
        ],
        details={
            "devices": n,
            "publish_connections": stack.control_plane.config.publish_connections,
            "notify_s": notify_s,
            # The control plane's part: StartRollout to every desired state signed,
            # stored, published and acknowledged by the broker.
            "published_s": published_s,
            "progress": progress,
            "cpu_during_notify_s": cpu,
            "fleet_online": online,
            "fleet_following_after_online_s": settled_s,
            "baseline": baseline,
        },
    )


class _Acked:
    """When the publisher's count of acknowledged desired states reached `target`."""

    def __init__(self, target: int, count: Callable[[], int]) -> None:
        self.at = 0.0
        self._target = target
        self._count = count
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        deadline = time.monotonic() + 600
        while self._count() < self._target and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._count() >= self._target:
            self.at = time.time()


def _percentile(progress: list[tuple[float, int]], n: int, q: float) -> float:
    for at, count in progress:
        if count >= q * n:
            return at
    return float("nan")


class _Fleet:
    """`ota-sim run --json --processes 2`, and the status lines it prints."""

    def __init__(self, server: str, token: str, root: Path, work: Path, n: int) -> None:
        self._log = work / "ota-sim.log"
        argv = [
            sys.executable,
            "-m",
            "device_sim.cli",
            "run",
            *("--devices", str(n), "--server", server, "--token", token, "--root", str(root)),
            *("--state-dir", str(work / "devices"), "--json"),
            *("--status-interval", str(STATUS_INTERVAL), "--processes", "2"),
        ]
        with self._log.open("w") as err:
            self._proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self._lines: list[dict[str, Any]] = []
        self._seen = 0
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._new:
                self._lines.append(parsed)
                self._new.notify_all()
        with self._new:
            self._lines.append({"event": "exit"})
            self._new.notify_all()

    def _next(self, index: int, deadline: float) -> dict[str, Any]:
        with self._new:
            while len(self._lines) <= index:
                if not self._new.wait(max(deadline - time.monotonic(), 0.0)):
                    raise TimeoutError("the simulated fleet stopped reporting")
            line = self._lines[index]
        if line["event"] == "exit":
            raise RuntimeError(
                f"ota-sim exited with {self._proc.wait()}:\n{self._log.read_text()[-2000:]}"
            )
        return line

    def wait_online(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        i = 0
        while True:
            line = self._next(i, deadline)
            i += 1
            if line["event"] == "online":
                self._seen = i
                return line

    def wait_following(self, n: int, timeout: float) -> float:
        """Seconds from now until a status line counts all n devices following their topic."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            line = self._next(self._seen, deadline)
            self._seen += 1
            if line["event"] == "status" and line["following"] >= n:
                return time.monotonic() - start

    def wait_generation(
        self, n: int, since: float, timeout: float
    ) -> tuple[float, list[tuple[float, int]]]:
        """When all n devices held the rollout's first generation; the count over time."""
        deadline = time.monotonic() + timeout
        progress: list[tuple[float, int]] = []
        i = self._seen
        while True:
            line = self._next(i, deadline)
            i += 1
            if line["event"] != "status" or line["time"] < since:
                continue
            verified = sum(c for g, c in line["generations"].items() if int(g) >= 1)
            if not progress or progress[-1][1] != verified:
                progress.append((round(line["time"] - since, 3), verified))
            if verified >= n:
                return line["time"], progress

    def stop(self) -> None:
        self._proc.terminate()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
