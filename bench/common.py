"""What every benchmark shares: results, the machine, a private broker and stack, waiting.

Each benchmark measures its figure and its same-run baseline, then returns a
`Result`; `bench.__main__` prints it and writes it to `bench/results/NAME.json`.
Times come from `time.perf_counter`; nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ota.broker import BrokerSettings, MosquittoProcess, PasswordFile, start_private_broker
from ota.broker.config import BrokerFiles
from ota.client import Client
from ota.devstack import BrokerEndpoint, DevStack
from ota.v1 import bundle_pb2, rollout_pb2

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The keys every result JSON carries (the smoke test checks them).
RESULT_KEYS = (
    "name",
    "mode",
    "figure",
    "baseline",
    "ratio",
    "targets",
    "met",
    "details",
    "machine",
    "started_at",
    "elapsed_s",
)


@dataclass(frozen=True)
class Figure:
    value: float | None
    unit: str
    label: str

    def text(self) -> str:
        if self.value is None:
            return f"{self.label}: n/a"
        return f"{self.label}: {fmt(self.value)} {self.unit}"


@dataclass(frozen=True)
class Target:
    """One PROTOCOL §9 target and whether this run met it (None: not measurable here)."""

    what: str
    met: bool | None
    note: str = ""


@dataclass
class Result:
    name: str
    mode: str
    figure: Figure
    baseline: Figure
    ratio: float | None
    targets: list[Target]
    details: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    elapsed_s: float = 0.0

    @property
    def met(self) -> bool | None:
        known = [t.met for t in self.targets if t.met is not None]
        if not known:
            return None
        return all(known)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "figure": dataclasses.asdict(self.figure),
            "baseline": dataclasses.asdict(self.baseline),
            "ratio": self.ratio,
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "met": self.met,
            "details": self.details,
            "machine": machine_info(),
            "started_at": self.started_at,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def ratio(figure: float | None, baseline: float | None) -> float | None:
    if figure is None or not baseline:
        return None
    return figure / baseline


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


_MACHINE: dict[str, Any] = {}


def machine_info() -> dict[str, Any]:
    if not _MACHINE:
        cpu = ""
        with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        try:
            mosquitto = subprocess.run(
                ["/usr/sbin/mosquitto", "-h"],
                capture_output=True,
                text=True,
                timeout=5,
                stdin=subprocess.DEVNULL,
                check=False,
            ).stdout.splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            mosquitto = ""
        _MACHINE.update(
            {
                "nproc": len(os.sched_getaffinity(0)),
                "cpu_model": cpu,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "mosquitto": mosquitto,
                "mem_total_mib": _meminfo_mib("MemTotal"),
            }
        )
    return dict(_MACHINE)


def _meminfo_mib(key: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) // 1024
    return None


def rss_kib(pid: int | None = None) -> int:
    """VmRSS of a process (this one by default), in KiB."""
    return _status_kib(pid, "VmRSS")


def hwm_kib(pid: int | None = None) -> int:
    """VmHWM (peak RSS) of a process, in KiB."""
    return _status_kib(pid, "VmHWM")


def _status_kib(pid: int | None, key: str) -> int:
    path = f"/proc/{pid or 'self'}/status"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(
    condition: Callable[[], bool], *, what: str, timeout: float, interval: float = 0.005
) -> float:
    """Poll until `condition` holds; returns the perf_counter time it was seen true."""
    deadline = time.perf_counter() + timeout
    pause = threading.Event()
    while True:
        if condition():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        pause.wait(interval)


def log(message: str) -> None:
    print(f"  . {message}", flush=True)


# --- a private broker whose accounts the benchmark can add to --------------------------


@dataclass
class BenchBroker:
    """A private Mosquitto with the generated config, plus extra control-plane users.

    The stack's own control user is `ota-control`; since the client id is the
    username, a second connection as that user would take over the control
    plane's session. Baselines connect as the extra users instead.
    """

    process: MosquittoProcess
    files: BrokerFiles
    control_password: str
    extra: dict[str, str]

    @property
    def host(self) -> str:
        return self.process.host

    @property
    def port(self) -> int:
        return self.process.port

    def endpoint(self) -> BrokerEndpoint:
        # A synchronous reload: devices registered through FleetService can
        # connect as soon as RegisterDevices returns.
        return BrokerEndpoint(
            host=self.host,
            port=self.port,
            control_username="ota-control",
            control_password=self.control_password,
            password_file=self.files.password_file,
            reload=self.process.reload,
        )

    def add_accounts(self, accounts: dict[str, str]) -> None:
        PasswordFile(self.files.password_file).set_many(accounts)
        self.process.reload()

    def stop(self) -> None:
        self.process.stop()


def start_broker(
    state_dir: Path, *, extra_users: tuple[str, ...] = (), **settings: Any
) -> BenchBroker:
    password = secrets.token_urlsafe(24)
    process, files = start_private_broker(
        state_dir,
        control_password=password,
        settings=BrokerSettings(port=0, extra_control_usernames=extra_users, **settings),
    )
    try:
        extra = {name: secrets.token_urlsafe(24) for name in extra_users}
        if extra:
            PasswordFile(files.password_file).set_many(extra)
            process.reload()
    except BaseException:
        process.stop()
        raise
    return BenchBroker(process, files, password, extra)


@contextlib.contextmanager
def bench_stack(
    state_dir: Path,
    *,
    extra_users: tuple[str, ...] = (),
    config_overrides: dict[str, object] | None = None,
    publish_connections: int | None = None,
    **broker_settings: Any,
) -> Iterator[tuple[DevStack, BenchBroker]]:
    """A DevStack (keys, control plane on SQLite) on a private broker; both stopped after.

    `publish_connections` (None: the shipped default) sets the control plane's
    setting and the broker accounts it needs.
    """
    overrides = dict(config_overrides or {})
    if publish_connections is not None:
        overrides["publish_connections"] = publish_connections
        broker_settings["publish_connections"] = publish_connections
    broker = start_broker(state_dir / "broker", extra_users=extra_users, **broker_settings)
    try:
        stack = DevStack.start(
            state_dir / "stack", broker=broker.endpoint(), config_overrides=overrides or None
        )
        try:
            yield stack, broker
        finally:
            stack.stop()
    finally:
        broker.stop()


# --- bundles and rollouts ---------------------------------------------------------------

MODELS = ["ev6", "ev9", "niro"]
REGIONS = ["eu", "us"]


def publish_bundle(
    client: Client,
    stack: DevStack,
    work: Path,
    *,
    feature: str,
    version: str,
    size: int,
    models: list[str] | None = None,
) -> bundle_pb2.Bundle:
    """Sign and publish a bundle of `size` pseudo-random bytes."""
    path = work / f"{feature}-{version}.bin"
    path.write_bytes(_pseudo_random(size))
    bundle = client.publish_bundle(
        path,
        feature=feature,
        version=version,
        models=models or MODELS,
        min_firmware="4.0",
        keys=[stack.keys.release_key],
    )
    path.unlink()
    return bundle


def _pseudo_random(size: int) -> bytes:
    # Cheap, incompressible enough for a transfer benchmark, deterministic.
    block = os.urandom(1 << 20)
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def create_rollout(
    client: Client, *, feature: str, version: str, stages_ppm: list[int], selector: str = ""
) -> rollout_pb2.Rollout:
    created: rollout_pb2.Rollout = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature=feature,
            version=version,
            selector=selector,
            stages=[rollout_pb2.Stage(ppm=p, min_soak_seconds=0) for p in stages_ppm],
            gate=rollout_pb2.FailureGate(
                max_failure_ppm=50_000, min_sample=5, action=rollout_pb2.GATE_ACTION_PAUSE
            ),
        ),
        metadata=client.metadata,
    )
    return created


def run_subprocess_json(args: list[str], *, timeout: float) -> dict[str, Any]:
    """Run `python -m bench._client ...` and parse the one JSON line it prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench._client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"bench client {args[0]} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
        )
    parsed: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return parsed
