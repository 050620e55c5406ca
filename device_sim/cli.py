"""`ota-sim`: run a simulated fleet against any control plane."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from itertools import chain
from pathlib import Path

import grpc

from device_sim import processes
from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import ClockSkew, FailureProfile, HealthProfile, compose_fleet
from device_sim.scenario import MAX_UNREACHABLE_FOR, Scenario, load_scenario
from ota.device.retry import RetryPolicy
from ota.device.source import Deadlines
from ota.errors import OtaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ota-sim", description="A simulated device fleet.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser(
        "run",
        help="provision N devices and keep them online",
        description="Register N devices with the admin token, connect them all and print a "
        "count of their states until Ctrl-C or --duration.",
    )
    run.add_argument("--devices", type=int, default=100, help="fleet size (default 100)")
    run.add_argument(
        "--server",
        default=os.environ.get("OTA_SERVER", "127.0.0.1:50051"),
        help="control plane address (env OTA_SERVER)",
    )
    run.add_argument(
        "--token",
        default=os.environ.get("OTA_TOKEN", ""),
        help="admin token, to register the devices",
    )
    run.add_argument(
        "--root",
        type=Path,
        required=True,
        help="the trusted root.json devices are provisioned with",
    )
    run.add_argument(
        "--models",
        default="ev6,ev9,niro",
        help="comma-separated models, assigned round-robin (default %(default)s)",
    )
    run.add_argument(
        "--regions",
        default="eu,us",
        help="comma-separated regions, assigned round-robin (default %(default)s)",
    )
    run.add_argument(
        "--firmware", default="4.2.0", help="every device's base firmware (default %(default)s)"
    )
    run.add_argument("--prefix", default="sim", help="device ids are PREFIX-000000, ...")
    run.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="MODEL[@VERSION]=P",
        help="install failure probability, e.g. ev9@2.0.0=1.0 (repeat)",
    )
    run.add_argument(
        "--crash",
        action="append",
        default=[],
        metavar="MODEL[@VERSION]=P",
        help="probability that a health sample reports a crash, e.g. '*@2.0.0=1.0' "
        "(MODEL or VERSION may be *; repeat)",
    )
    run.add_argument(
        "--use",
        action="append",
        default=[],
        metavar="MODEL[@VERSION]=P",
        help="share of health samples in which the feature was used, e.g. 'ev6=0.8' "
        "(MODEL or VERSION may be *; repeat)",
    )
    run.add_argument(
        "--health-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="every online device sends a health sample this often (0: only on activation)",
    )
    run.add_argument(
        "--clock-skew",
        action="append",
        default=[],
        metavar="PATTERN=SECONDS",
        help="clock offset of the devices whose id matches PATTERN (fnmatch), e.g. "
        "'sim-00000[0-4]=-7200' for two hours behind (repeat; first match wins)",
    )
    run.add_argument(
        "--download-attempts",
        type=int,
        default=RetryPolicy().attempts,
        help="calls per metadata file or bundle before a device gives up (with backoff)",
    )
    run.add_argument(
        "--unreachable-for",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a device keeps retrying (with jittered backoff, keeping its place) "
        "while the control plane cannot be reached -- a restart, an outage -- before it "
        f"reports CONTROL_PLANE_UNREACHABLE (default {RetryPolicy().unreachable_for:g}, "
        "or the scenario's unreachable_for)",
    )
    run.add_argument(
        "--download-deadline",
        type=float,
        default=Deadlines().download_base,
        metavar="SECONDS",
        help="deadline of a bundle download call, plus the time its bytes take at "
        f"{Deadlines().download_min_rate / 1024:.0f} KiB/s",
    )
    run.add_argument(
        "--delivery",
        choices=("grpc", "http"),
        default="grpc",
        help="fetch TUF metadata and bundles from the control plane (grpc) or over HTTP "
        "from --origin-url (the delivery origin, or a cache or CDN in front of it)",
    )
    run.add_argument("--origin-url", default="", metavar="URL", help="e.g. http://cdn:8080")
    run.add_argument(
        "--origin-token",
        default=os.environ.get("OTA_ORIGIN_TOKEN", ""),
        help="the fleet's delivery token, if the cache requires one (env OTA_ORIGIN_TOKEN)",
    )
    run.add_argument(
        "--origin-ca",
        type=Path,
        metavar="PEM",
        help="the CA of the origin's (or cache's) HTTPS certificate; default: the system's CAs. "
        "With --identity cert each device also presents its certificate to it",
    )
    run.add_argument(
        "--identity",
        choices=("password", "cert"),
        default="password",
        help="cert: each device makes its key, enrolls for a certificate with a one-time "
        "token and uses mutual TLS (needs --device-server and --server-ca)",
    )
    run.add_argument(
        "--device-server",
        default="",
        metavar="HOST:PORT",
        help="the control plane's device port (device_listen), for --identity cert",
    )
    run.add_argument(
        "--server-ca",
        type=Path,
        metavar="PEM",
        help="the CA of the control plane's and the broker's certificates",
    )
    run.add_argument("--state-dir", type=Path, help="device state (default: temporary)")
    run.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    run.add_argument("--seed", type=int, default=1, help="fixes the randomness (default 1)")
    run.add_argument(
        "--status-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often to print the fleet's status (default 5)",
    )
    run.add_argument(
        "--no-pull",
        action="store_true",
        help="do not ask the control plane for the desired state on connect; only for a "
        "broker with persistence, which keeps every device's desired state retained",
    )
    run.add_argument(
        "--scenario",
        type=Path,
        metavar="FILE",
        help="a YAML scenario: fleet composition, failures, churn, latency, clock skew and "
        "misbehaving devices (replaces --devices, --models, --regions, --firmware, --prefix)",
    )
    run.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="split the fleet over N processes (one per core suits a large fleet)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable lines: one JSON object per status line",
    )
    run.add_argument(
        "--hold",
        action="store_true",
        help="register and build the devices, print 'prepared', and connect them only "
        "once a line arrives on standard input (to time the connect alone)",
    )
    # One process of a --processes fleet: run slice I of N.
    run.add_argument("--slice", default="", help=argparse.SUPPRESS)
    return parser


def _positive(value: int, field: str) -> int:
    if value < 1:
        raise OtaError("must be at least 1", field=field)
    return value


def _unreachable_for(args: argparse.Namespace, scenario: Scenario | None) -> float:
    """Seconds devices wait out an unreachable control plane: the flag, the scenario, or 600."""
    seconds: float | None = args.unreachable_for
    if seconds is None and scenario is not None:
        seconds = scenario.unreachable_for
    if seconds is None:
        return RetryPolicy().unreachable_for
    if not 0 <= seconds <= MAX_UNREACHABLE_FOR:
        raise OtaError(
            f"must be between 0 and {MAX_UNREACHABLE_FOR:g} seconds", field="unreachable_for"
        )
    return seconds


def _scratch() -> str | None:
    """Where a temporary fleet keeps its state: memory (tmpfs) where there is one.

    Building a device creates a handful of files and directories; on a busy
    disk that costs milliseconds each, minutes for a large fleet.
    """
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def run(args: argparse.Namespace) -> int:
    _positive(args.devices, "devices")
    _positive(args.processes, "processes")
    scenario = load_scenario(args.scenario) if args.scenario else None
    try:
        root = args.root.read_bytes()
    except OSError as exc:
        raise OtaError(f"cannot read {args.root}: {exc.strerror}", field="root") from exc
    if args.identity == "cert" and not (args.device_server and args.server_ca):
        raise OtaError(
            "--identity cert needs --device-server and --server-ca", field="device_server"
        )
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="ota-sim-", dir=_scratch()))
    if args.processes > 1:
        return processes.run_parent(args, state_dir)
    if scenario is not None:
        profiles = scenario.devices()
    else:
        profiles = compose_fleet(
            args.devices,
            models=args.models.split(","),
            regions=args.regions.split(","),
            firmware=args.firmware,
            prefix=args.prefix,
        )
    index, count = processes.parse_slice(args.slice)
    profiles = processes.share(profiles, index, count)
    seed = (scenario.seed if scenario else args.seed) + index
    skew: Callable[[str], timedelta] | None = (
        ClockSkew.parse(args.clock_skew) if args.clock_skew else None
    )
    health_interval = max(args.health_interval, 0.0)
    if scenario is not None:
        skew = skew or scenario.clock_skew_fn()
        health_interval = health_interval or scenario.health_interval
    fleet = SimulatedFleet(
        profiles,
        FleetSettings(
            server=args.server,
            admin_token=args.token,
            trusted_root=root,
            state_dir=state_dir,
            failures=FailureProfile.parse(args.fail),
            health=HealthProfile.parse(args.crash, args.use),
            health_interval=health_interval,
            seed=seed,
            clock_skew=skew,
            retry=RetryPolicy(
                attempts=_positive(args.download_attempts, "download_attempts"),
                unreachable_for=_unreachable_for(args, scenario),
            ),
            deadlines=Deadlines(download_base=args.download_deadline),
            scenario=scenario,
            pull_on_connect=not args.no_pull,
            delivery=args.delivery,
            origin_url=args.origin_url,
            origin_token=args.origin_token,
            origin_ca=args.origin_ca,
            identity=args.identity,
            device_server=args.device_server,
            server_ca=args.server_ca,
        ),
    )
    out = processes.Output(json_lines=args.json)
    interval = args.status_interval
    if not interval > 0:
        raise OtaError("must be positive", field="status_interval")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        rss0 = processes.rss_kib()
        fleet.prepare()
        if args.hold:
            out.event("prepared", devices=len(profiles))
            if not sys.stdin.readline():
                return 0  # the parent went away before the start
        cpu0 = processes.cpu_s()
        fleet.connect(timeout=max(120.0, len(profiles) / 50))
        rss = processes.rss_kib()
        connect_cpu_s = processes.cpu_s() - cpu0
        fleet.start_scenario()
        out.event(
            "online",
            devices=len(profiles),
            state_dir=str(state_dir),
            rss_kib=rss,
            rss_before_kib=rss0,
            cpu_s=round(processes.cpu_s(), 3),
            connect_cpu_s=round(connect_cpu_s, 3),
            **{k: round(v, 4) for k, v in fleet.timings.items()},
        )
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stop.wait(_next_wait(interval, deadline)):
            # Every few milliseconds over the whole fleet, holding the devices' own
            # interpreter: one pass per figure, counted by Counter in C, costs a
            # third of a Python loop updating three tallies per device.
            devices = fleet.devices
            states = Counter(chain.from_iterable([d.record.last_state.values() for d in devices]))
            generations = Counter([d.trust.accepted_generation for d in devices])
            following = sum([d.following.is_set() for d in devices])
            out.status(states, fleet.misbehaviour_counts(), generations, following)
            # Certificates renew from two thirds of their lifetime (90 days: day 60).
            fleet.renew_due()
            if deadline is not None and time.monotonic() >= deadline:
                break
    finally:
        fleet.stop()
    return 0


def _next_wait(interval: float, deadline: float | None) -> float:
    if deadline is None:
        return interval
    return max(min(interval, deadline - time.monotonic()), 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except OtaError as exc:
        print(f"ota-sim: error: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"ota-sim: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
