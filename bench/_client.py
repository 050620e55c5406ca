"""Client loops run in a child process, so the server under test keeps its own GIL.

`python -m bench._client rpc|download|raw ...` prints one JSON line with what
it measured. The same loop drives the system under test and its baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from ota.v1 import bundle_pb2, bundle_pb2_grpc, rollout_pb2, rollout_pb2_grpc

if TYPE_CHECKING:
    from device_sim.fleet import SimulatedFleet

MIB = 1024 * 1024


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def rpc(args: argparse.Namespace) -> dict[str, Any]:
    """GetRollout in a loop from `threads` threads, each on its own channel."""
    md = _metadata(args.token)
    request = rollout_pb2.GetRolloutRequest(rollout_id=args.rollout_id)
    start = time.perf_counter() + args.warmup
    end = start + args.seconds
    counts = [0] * args.threads
    errors = [0] * args.threads
    latencies: list[list[float]] = [[] for _ in range(args.threads)]

    def loop(i: int) -> None:
        with grpc.insecure_channel(args.target) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    stub.GetRollout(request, metadata=md, timeout=10)
                except grpc.RpcError:
                    errors[i] += 1
                    continue
                t1 = time.perf_counter()
                if start <= t0 and t1 <= end:
                    counts[i] += 1
                    latencies[i].append(t1 - t0)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = sorted(x for per in latencies for x in per)
    total = sum(counts)
    return {
        "calls": total,
        "errors": sum(errors),
        "seconds": args.seconds,
        "rps": total / args.seconds,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
    }


def download(args: argparse.Namespace) -> dict[str, Any]:
    """DownloadBundle, hashing every chunk; optionally cut halfway and resume."""
    md = _metadata(args.token)
    runs: list[float] = []
    ok = True
    with grpc.insecure_channel(args.target) as channel:
        stub = bundle_pb2_grpc.BundleServiceStub(channel)
        for _ in range(args.repeat):
            digest = hashlib.sha256()
            received = 0
            t0 = time.perf_counter()
            for part in stub.DownloadBundle(
                bundle_pb2.DownloadBundleRequest(target_path=args.target_path),
                metadata=md,
                timeout=120,
            ):
                digest.update(part.chunk)
                received += len(part.chunk)
            elapsed = time.perf_counter() - t0
            ok = ok and received == args.length and digest.hexdigest() == args.sha256
            runs.append(received / MIB / elapsed)
        resume_ok = None
        if args.cut:
            resume_ok = _cut_and_resume(stub, md, args)
    return {"mib_s": runs, "ok": ok, "resume_ok": resume_ok}


def _cut_and_resume(
    stub: bundle_pb2_grpc.BundleServiceStub, md: tuple[tuple[str, str], ...], args: Any
) -> bool:
    digest = hashlib.sha256()
    received = 0
    call = stub.DownloadBundle(
        bundle_pb2.DownloadBundleRequest(target_path=args.target_path), metadata=md, timeout=120
    )
    for part in call:
        digest.update(part.chunk)
        received += len(part.chunk)
        if received >= args.length // 2:
            call.cancel()  # type: ignore[no-untyped-call]  # the cut: the connection drops mid-stream
            break
    for part in stub.DownloadBundle(
        bundle_pb2.DownloadBundleRequest(target_path=args.target_path, offset=received),
        metadata=md,
        timeout=120,
    ):
        digest.update(part.chunk)
        received += len(part.chunk)
    return bool(received == args.length and digest.hexdigest() == args.sha256)


def raw(args: argparse.Namespace) -> dict[str, Any]:
    """Receive the same bytes over a plain loopback TCP socket, hashing them."""
    runs: list[float] = []
    ok = True
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    for _ in range(args.repeat):
        digest = hashlib.sha256()
        received = 0
        t0 = time.perf_counter()
        with socket.create_connection((args.host, args.port)) as s:
            while True:
                n = s.recv_into(buf)
                if not n:
                    break
                digest.update(view[:n])
                received += n
        elapsed = time.perf_counter() - t0
        ok = ok and received == args.length and digest.hexdigest() == args.sha256
        runs.append(received / MIB / elapsed)
    return {"mib_s": runs, "ok": ok}


def publish(args: argparse.Namespace) -> dict[str, Any]:
    """Devices publish their events (QoS 1, own credentials), from this child process."""
    from bench.mqtt_tools import device_events, publish_events
    from ota.transport.topics import Topics

    spec = json.loads(Path(args.spec).read_text())
    sha = bytes.fromhex(spec["sha256"])
    payloads = {
        d: device_events(
            d,
            spec["per_device"],
            rollout_id=spec["rollout_id"],
            feature=spec["feature"],
            version=spec["version"],
            sha256=sha,
            first_seq=spec.get("first_seq", 1),
        )
        for d in spec["accounts"]
    }
    connect_s, publish_s = publish_events(
        spec["host"], spec["port"], spec["accounts"], payloads, Topics(spec["topic_root"])
    )
    return {"connect_s": connect_s, "publish_s": publish_s}


def fleet(args: argparse.Namespace) -> dict[str, Any]:
    """A SimulatedFleet in this child process, so devices do not share the control plane's GIL.

    Prints a `ready` line once every device is connected and subscribed, then
    waits for one JSON line on stdin (the rollout id and the states the report
    counts) and reports what the devices did once they agree or settle.
    """
    import sys

    import device_sim.fleet as fleet_module
    from device_sim.fleet import FleetSettings, SimulatedFleet
    from device_sim.profile import FailureProfile, compose_fleet

    # SimulatedFleet.start registers, then connects; time the registration apart.
    register = fleet_module.provision
    register_s: list[float] = []

    def timed_register(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return register(*a, **kw)
        finally:
            register_s.append(time.perf_counter() - t)

    fleet_module.provision = timed_register

    spec = json.loads(Path(args.spec).read_text())
    rss0 = _rss_kib()
    sim = SimulatedFleet(
        compose_fleet(
            spec["devices"],
            models=spec["models"],
            regions=spec["regions"],
            firmware="4.2.0",
        ),
        FleetSettings(
            server=spec["server"],
            admin_token=spec["token"],
            trusted_root=Path(spec["root"]).read_bytes(),
            state_dir=Path(spec["state_dir"]),
            failures=FailureProfile(),
        ),
    )
    try:
        t0 = time.perf_counter()
        sim.start(timeout=spec["timeout"])
        start_s = time.perf_counter() - t0
        ready = {
            "start_s": start_s,
            "following_s": wait_following(sim, spec["timeout"]),
            "register_s": sum(register_s),
            "rss_delta_kib": _rss_kib() - rss0,
            "cpu_s": _cpu_s(),
        }
        print(json.dumps(ready), flush=True)
        asked = json.loads(sys.stdin.readline())
        outcomes, waited = settled_outcomes(sim, asked["rollout_id"], asked["expect"])
        return {
            "outcomes": outcomes,
            "settle_s": waited,
            "events_sent": sum(d.record.events_sent for d in sim.devices),
            "rss_kib": _rss_kib(),
            "cpu_s": _cpu_s(),
        }
    finally:
        sim.stop()


def wait_following(sim: SimulatedFleet, timeout: float) -> float:
    """Seconds until every device of `sim` follows its desired-state topic.

    Connected is not idle: each device still pulls its desired state over gRPC,
    and a desired state published meanwhile waits behind that pull. A rollout
    benchmark starts its clock on a fleet that follows its topics.
    """
    t0 = time.monotonic()
    sim.wait_following(timeout)
    return time.monotonic() - t0


def settled_outcomes(
    sim: Any, rollout_id: str, expect: dict[str, int], limit_s: float = 120.0
) -> tuple[dict[str, int], float]:
    """What the devices recorded, once it equals `expect` or `limit_s` has passed.

    A device records a step only after its PUBACK, so when the control plane has
    seen the last event a few devices may still be waiting for theirs (or, after
    a lost connection, resuming the step on a new session). Returns the
    outcomes and how long that took.
    """
    t0 = time.perf_counter()
    pause = threading.Event()
    while True:
        outcomes = dict(sim.outcomes(rollout_id))
        waited = time.perf_counter() - t0
        if outcomes == expect or waited >= limit_s:
            return outcomes, waited
        pause.wait(0.5)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _rss_kib() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._client")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("rpc")
    p.add_argument("--target", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--rollout-id", required=True)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.set_defaults(fn=rpc)
    p = sub.add_parser("download")
    p.add_argument("--target", required=True)
    p.add_argument("--token", default="")
    p.add_argument("--target-path", required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cut", action="store_true")
    p.set_defaults(fn=download)
    p = sub.add_parser("raw")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sha256", required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.set_defaults(fn=raw)
    p = sub.add_parser("publish")
    p.add_argument("--spec", required=True, help="JSON: host, port, accounts, per_device, ...")
    p.set_defaults(fn=publish)
    p = sub.add_parser("fleet")
    p.add_argument("--spec", required=True, help="JSON: server, token, root, devices, ...")
    p.set_defaults(fn=fleet)
    args = parser.parse_args()
    print(json.dumps(args.fn(args)), flush=True)


if __name__ == "__main__":
    main()
