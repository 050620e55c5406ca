"""`ota-agent` processes for end-to-end tests, provisioned the way a device team does it.

Each agent gets its config from `ota fleet register --agent-config` (the real
CLI), a device root directory its hooks write into (``DEVICE_ROOT`` in their
environment), and runs as a child process the test can SIGTERM or power-cut
(SIGKILL of the agent and every process under it, hooks included).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from ota.agent.config import render_config
from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import fleet_pb2, rollout_pb2
from tests.e2e.scenario import wait_for

ROOT = Path(__file__).resolve().parents[2]

# Idempotent hooks, as the contract asks: each writes its effect to a temporary
# name and renames it into place, so running again after a power cut is harmless.
# Each also logs "start"/"done" lines the test reads. HOOK_SLEEP widens the windows
# a power cut can hit.
_HOOKS = {
    "install": """#!/bin/sh
set -e
R="$DEVICE_ROOT"
echo "start install $OTA_FEATURE $OTA_VERSION prev=$OTA_PREVIOUS_VERSION" >> "$R/hooks.log"
if [ -e "$R/fail-install-$OTA_VERSION" ]; then
    echo "no room for $OTA_FEATURE $OTA_VERSION" >&2
    exit 7
fi
[ "$(sha256sum "$OTA_BUNDLE" | cut -d' ' -f1)" = "$OTA_SHA256" ] || exit 9
mkdir -p "$R/slots/$OTA_FEATURE"
cp "$OTA_BUNDLE" "$R/slots/$OTA_FEATURE/$OTA_VERSION.tmp"
sleep "${HOOK_SLEEP:-0}"
mv "$R/slots/$OTA_FEATURE/$OTA_VERSION.tmp" "$R/slots/$OTA_FEATURE/$OTA_VERSION"
echo "done install $OTA_FEATURE $OTA_VERSION" >> "$R/hooks.log"
""",
    "activate": """#!/bin/sh
set -e
R="$DEVICE_ROOT"
echo "start activate $OTA_FEATURE $OTA_VERSION prev=$OTA_PREVIOUS_VERSION" >> "$R/hooks.log"
[ -e "$R/slots/$OTA_FEATURE/$OTA_VERSION" ] || { echo "not installed" >&2; exit 4; }
printf %s "$OTA_VERSION" > "$R/current-$OTA_FEATURE.tmp"
sleep "${HOOK_SLEEP:-0}"
mv "$R/current-$OTA_FEATURE.tmp" "$R/current-$OTA_FEATURE"
echo "done activate $OTA_FEATURE $OTA_VERSION" >> "$R/hooks.log"
""",
    "rollback": """#!/bin/sh
set -e
R="$DEVICE_ROOT"
echo "start rollback $OTA_FEATURE $OTA_VERSION prev=$OTA_PREVIOUS_VERSION" >> "$R/hooks.log"
[ -e "$R/slots/$OTA_FEATURE/$OTA_VERSION" ] || { echo "not installed" >&2; exit 4; }
printf %s "$OTA_VERSION" > "$R/current-$OTA_FEATURE.tmp"
mv "$R/current-$OTA_FEATURE.tmp" "$R/current-$OTA_FEATURE"
echo "done rollback $OTA_FEATURE $OTA_VERSION" >> "$R/hooks.log"
""",
    "deactivate": """#!/bin/sh
set -e
R="$DEVICE_ROOT"
echo "start deactivate $OTA_FEATURE $OTA_VERSION" >> "$R/hooks.log"
printf off > "$R/current-$OTA_FEATURE.tmp"
mv "$R/current-$OTA_FEATURE.tmp" "$R/current-$OTA_FEATURE"
echo "done deactivate $OTA_FEATURE $OTA_VERSION" >> "$R/hooks.log"
""",
    "health": """#!/bin/sh
echo '{"crash_count": 0, "feature_error_count": 0, "usage": {"opened": 2}}'
""",
}


def write_hooks(directory: Path, overrides: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in {**_HOOKS, **(overrides or {})}.items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o755)
    return directory


class AgentProcess:
    """One `ota-agent --config FILE` child process and the device directory its hooks use."""

    def __init__(self, device_id: str, config: Path, device_root: Path, env: dict[str, str]):
        self.device_id = device_id
        self.config = config
        self.device_root = device_root
        self.env = env
        self.log = config.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def start(self) -> None:
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ota.agent.cli", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                env={**os.environ, **self.env, "DEVICE_ROOT": str(self.device_root)},
            )

    def log_since_start(self) -> str:
        with self.log.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")

    def wait_following(self, timeout: float = 60.0) -> None:
        """Until this run of the agent has connected and pulled its desired state."""
        wait_for(
            lambda: "following desired state generation" in self.log_since_start(),
            what=f"{self.device_id} to follow its desired state",
            timeout=timeout,
        )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def power_cut(self) -> None:
        """SIGKILL the agent and everything it started, at once, as a power loss does."""
        assert self.process is not None
        for pid in [*_descendants(self.process.pid), self.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process is not None else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise AssertionError(f"{self.device_id} did not stop on SIGTERM") from None

    def hook_lines(self) -> list[str]:
        path = self.device_root / "hooks.log"
        return path.read_text().splitlines() if path.exists() else []

    def current(self, feature: str) -> str:
        path = self.device_root / f"current-{feature}"
        return path.read_text() if path.exists() else ""


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def provision_agent(
    stack: DevStack,
    base: Path,
    device_id: str,
    hooks: Path,
    *,
    model: str = "ev6",
    hook_timeout: float = 20.0,
    health_interval: float = 0.0,
    json_logs: bool = False,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    """`ota fleet register --agent-config` for one device, then the test's limits in its file."""
    directory = base / device_id
    directory.mkdir(parents=True)
    config = directory / "agent.toml"
    tls: list[str] = []
    if stack.pki is not None:
        tls = ["--tls-ca", str(stack.pki.ca_cert)]
    if stack.pki is not None and stack.mtls:
        cert, key = str(stack.pki.client_cert), str(stack.pki.client_key)
        tls += ["--tls-cert", cert, "--tls-key", key, "--device-cert", cert, "--device-key", key]
    rc = ota_main(
        [
            *("fleet", "register", device_id, "--model", model, "--region", "eu"),
            *("--firmware", "4.2.0", "--label", "bench=e2e"),
            *("--server", stack.server, "--token", stack.admin_token, *tls),
            *("--agent-config", str(config), "--root", str(stack.keys.root_json)),
            *("--agent-state-dir", "state", "--hooks-dir", str(hooks)),
        ]
    )
    assert rc == 0
    assert config.stat().st_mode & 0o777 == 0o600
    doc = tomllib.loads(config.read_text())
    doc["health_interval_seconds"] = health_interval
    if json_logs:
        doc["log_format"] = "json"
    doc["hooks"] = {**doc["hooks"], "timeout_seconds": hook_timeout}
    config.write_text(render_config(doc))
    root = directory / "device"
    root.mkdir()
    return AgentProcess(device_id, config, root, env or {})


def wait_rollout(
    client: Client,
    rollout_id: str,
    done: Callable[[rollout_pb2.Rollout], bool],
    *,
    what: str,
    timeout: float = 120.0,
) -> rollout_pb2.Rollout:
    seen: list[rollout_pb2.Rollout] = []

    def check() -> bool:
        r = client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
        )
        seen[:] = [r]
        return done(r)

    try:
        wait_for(check, what=what, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last: {seen[0] if seen else None}") from None
    return seen[0]


def device_events(client: Client, device_id: str) -> list[object]:
    response = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id, event_limit=500),
        metadata=client.metadata,
    )
    return list(response.events)


def device_online(client: Client, device_id: str) -> bool:
    response = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id), metadata=client.metadata
    )
    return bool(response.device.online)


def stop_all(agents: list[AgentProcess]) -> None:
    for agent in agents:
        if agent.alive():
            agent.stop()


def until(deadline_seconds: float) -> Callable[[], bool]:
    end = time.monotonic() + deadline_seconds
    return lambda: time.monotonic() < end
