"""fleet-connect: N simulated devices connected and subscribed; time and RSS per device.

PROTOCOL §9: 10 000 in <= 5 s, <= 64 KiB RSS each; no baseline. A DevStack
control plane runs in this process on a private Mosquitto; the fleet is
`ota-sim run --json` in child processes (one, or one per core with
`--processes`), as devices would be. Each device has its own connection and
credentials, and runs the simulator's real firmware: after subscribing it
resumes its work and pulls its desired state over gRPC, as on every boot.

Figure: seconds from "go" (every device registered and built) until the last
device is connected and subscribed, at the largest N, for the default
simulator (one process, pull on connect); the fastest layout measured is shown
beside it. RSS per device is the
simulator's RSS growth from before registering to all connected, divided by
N: everything a device costs, its TUF trust state and paho client included.
Registration (RegisterDevices, the broker's password file) is timed apart.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import Figure, Result, Target, bench_stack, cpu_s, log, rss_kib
from ota.devstack import DevStack

ROOT = Path(__file__).resolve().parent.parent
TARGET_DEVICES = 10_000
TARGET_S = 5.0
TARGET_KIB = 64.0


def run(quick: bool) -> Result:
    # (devices, processes, pull on connect): the default simulator at growing sizes, then
    # the target size without the gRPC pull (a broker with persistence), on one and two cores.
    layouts = (
        [(100, 1, True)]
        if quick
        else [
            (1_000, 1, True),
            (5_000, 1, True),
            (10_000, 1, True),
            (10_000, 1, False),
            (10_000, 2, False),
        ]
    )
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-connect-", dir=scratch_dir()) as tmp,
        bench_stack(Path(tmp)) as (stack, broker),
    ):
        log(f"broker open-file limit {broker.process.open_files_limit}")
        pid = broker.process.pid

        def measure() -> tuple[float, float, int]:
            return cpu_s(), cpu_s(pid), rss_kib(pid)

        for n, processes, pull in layouts:
            r = connect_fleet(
                stack,
                Path(tmp) / f"fleet-{len(runs)}",
                n,
                processes=processes,
                pull=pull,
                prefix=f"fc{len(runs)}",
                measure=measure,
            )
            runs.append(r)
            log(
                f"{n} devices, {processes} process(es), pull {'on' if pull else 'off'}: "
                f"connected and subscribed in {r['connect_s']:.2f} s "
                f"(registered in {r['provision_s']:.2f} s before), "
                f"{r['rss_per_device_kib']:.1f} KiB RSS each, "
                f"broker +{r['broker_rss_per_device_kib']:.1f} KiB each; CPU s: simulator "
                f"{r['simulator_cpu_s']:.1f}, broker {r['broker_cpu_s']:.1f}, control plane "
                f"{r['control_plane_cpu_s']:.1f}; "
                f"load {r['loadavg_1min']:.1f}"
            )
    largest = max(r["devices"] for r in runs)
    at_largest = [r for r in runs if r["devices"] == largest]
    # The headline is the simulator as shipped (one process, pull on connect); the
    # fastest layout is shown beside it, not in its place.
    default = next(r for r in at_largest if r["processes"] == 1 and r["pull"])
    best = min(at_largest, key=lambda r: r["connect_s"])
    n = default["devices"]
    at_target = n >= TARGET_DEVICES
    best_how = f"{best['processes']} process(es), pull {'on' if best['pull'] else 'off'}"
    beside = (
        f"; best layout ({best_how}): {best['connect_s']:.2f} s, "
        f"{best['rss_per_device_kib']:.1f} KiB each"
        if best is not default
        else ""
    )
    return Result(
        name="fleet-connect",
        mode="quick" if quick else "full",
        figure=Figure(
            default["connect_s"],
            "s",
            f"{n} devices connected and subscribed (default: 1 process, pull on connect)",
        ),
        baseline=Figure(None, "", "no baseline (PROTOCOL §9)"),
        ratio=None,
        targets=[
            Target(
                f"{TARGET_DEVICES} devices in <= {TARGET_S:g} s",
                default["connect_s"] <= TARGET_S if at_target else None,
                ("" if at_target else f"measured {n} devices only") + beside,
            ),
            Target(
                f"<= {TARGET_KIB:g} KiB RSS per device",
                default["rss_per_device_kib"] <= TARGET_KIB if at_target else None,
                f"{default['rss_per_device_kib']:.1f} KiB",
            ),
        ],
        details={"runs": runs, "best_layout": best},
    )


def scratch_dir() -> str | None:
    """tmpfs where there is one: a device's state files cost milliseconds each on a busy disk."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def connect_fleet(
    stack: DevStack,
    state_dir: Path,
    n: int,
    *,
    processes: int,
    prefix: str,
    pull: bool = True,
    measure: Callable[[], tuple[float, float, int]] | None = None,
) -> dict[str, Any]:
    """The fleet registers and builds its devices, then connects them on "go".

    `measure` returns (control plane CPU s, broker CPU s, broker RSS KiB); it is
    read at "go" and once all are connected, so its differences cover the connect.
    The simulator is stopped once every device is online.
    """
    argv = [
        sys.executable,
        "-m",
        "device_sim.cli",
        "run",
        *("--devices", str(n), "--prefix", prefix, "--processes", str(processes)),
        *("--server", stack.server, "--token", stack.admin_token),
        *("--root", str(stack.keys.root_json), "--state-dir", str(state_dir), "--json", "--hold"),
        *([] if pull else ["--no-pull"]),
    ]
    timeout = max(120.0, n / 20)
    state_dir.mkdir(parents=True, exist_ok=True)
    errors = state_dir / "ota-sim.log"
    with (
        errors.open("w") as err,
        subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
        ) as proc,
    ):
        try:
            lines = _Lines(proc, errors)
            lines.wait_for("prepared", timeout)
            before = measure() if measure else (0.0, 0.0, 0)
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            online = lines.wait_for("online", timeout)
            after = measure() if measure else (0.0, 0.0, 0)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    per_device = (online["rss_kib"] - online["rss_before_kib"]) / n
    return {
        "devices": n,
        "processes": processes,
        "pull": pull,
        "connect_s": online["connect_s"],
        "provision_s": online["provision_s"],
        "rss_kib": online["rss_kib"],
        "rss_before_kib": online["rss_before_kib"],
        "rss_per_device_kib": per_device,
        "simulator_cpu_s": online["connect_cpu_s"],
        "control_plane_cpu_s": after[0] - before[0],
        "broker_cpu_s": after[1] - before[1],
        "broker_rss_per_device_kib": (after[2] - before[2]) / n,
        "loadavg_1min": os.getloadavg()[0],
    }


class _Lines:
    """The JSON lines `ota-sim run --json` prints, read on a thread."""

    def __init__(self, proc: subprocess.Popen[str], errors: Path) -> None:
        self._proc, self._errors = proc, errors
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            try:
                self._lines.put(json.loads(line))
            except json.JSONDecodeError:
                continue
        self._lines.put(None)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                line = None
            if line is None:
                err = self._errors.read_text()[-2000:]
                raise RuntimeError(f"ota-sim did not say {event!r} within {timeout:.0f}s:\n{err}")
            if line.get("event") == event:
                return line
