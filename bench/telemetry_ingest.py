"""telemetry-ingest: DeviceEvents persisted per second, broker → control plane → SQLite.

Both sides drain the same backlog, so the publishers (slower than either
consumer on two cores) are not what is measured:

- baseline: a paho subscriber on a persistent session subscribes, goes
  offline; D devices publish N events (QoS 1, own credentials); the
  subscriber reconnects and only counts until it has all N.
- control plane: D devices are registered through FleetService and exposed
  by a running one-stage rollout; the control plane stops (its persistent
  session keeps the shared subscription); the devices publish N valid events
  of that rollout (install lifecycle, then ACTIVE health samples); a new
  control plane starts and ingests until `Ingester.stored` reaches N —
  deduplicated insert, progress update, commit, then the MQTT ack.

The broker's per-session queue limit is raised to hold the whole backlog.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func
from sqlmodel import select

from bench.common import (
    MODELS,
    REGIONS,
    BenchBroker,
    Figure,
    Result,
    Target,
    create_rollout,
    hwm_kib,
    log,
    publish_bundle,
    ratio,
    rss_kib,
    run_subprocess_json,
    start_broker,
    wait_until,
)
from bench.mqtt_tools import CountingSubscriber
from device_sim.fleet import provision
from device_sim.profile import compose_fleet
from ota.app import ControlPlane, MosquittoAccounts
from ota.broker import generate_secret
from ota.client import Client
from ota.devstack import DevStack
from ota.store.models import DeviceEventRow, RolloutRow
from ota.transport.topics import Topics
from ota.v1 import rollout_pb2

NAME = "telemetry-ingest"
COUNTER_USER = "bench-counter"


def _publish(
    broker: BenchBroker,
    accounts: dict[str, str],
    per_device: int,
    topics: Topics,
    *,
    rollout_id: str = "",
    feature: str = "",
    version: str = "",
    sha256: bytes = b"",
    first_seq: int = 1,
) -> tuple[float, float]:
    """The devices publish from a child process, so the control plane's RSS is its own."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="ota-bench-spec-") as spec:
        json.dump(
            {
                "host": broker.host,
                "port": broker.port,
                "accounts": accounts,
                "per_device": per_device,
                "topic_root": topics.root,
                "rollout_id": rollout_id,
                "feature": feature,
                "version": version,
                "sha256": sha256.hex(),
                "first_seq": first_seq,
            },
            spec,
        )
        spec.flush()
        out = run_subprocess_json(["publish", "--spec", spec.name], timeout=600)
    return float(out["connect_s"]), float(out["publish_s"])


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of this process, plus that of the processes `pids`."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    total = usage.ru_utime + usage.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _baseline(broker: BenchBroker, devices: int, per_device: int, topics: Topics) -> dict[str, Any]:
    n = devices * per_device
    ids = [f"base-{i:05d}" for i in range(devices)]
    accounts = {d: generate_secret() for d in ids}
    broker.add_accounts(accounts)
    counter = CountingSubscriber(
        broker.host,
        broker.port,
        COUNTER_USER,
        broker.extra[COUNTER_USER],
        f"{topics.root}/devices/+/events",
    )
    counter.prepare()
    connect_s, publish_s = _publish(broker, accounts, per_device, topics)
    log(f"baseline backlog: {n:,} events from {devices} devices in {publish_s:.2f} s")
    cpu0 = _cpu_seconds([])
    drain_s, count = counter.drain(n, timeout=max(120.0, n / 1000))
    cpu_s = _cpu_seconds([]) - cpu0
    return {
        "cpu_s": cpu_s,
        "cpu_us_per_event": cpu_s / n * 1e6,
        "events": count,
        "seconds": drain_s,
        "events_per_s": count / drain_s,
        "publish_s": publish_s,
        "publish_events_per_s": n / publish_s,
        "connect_s": connect_s,
    }


def _measured(
    broker: BenchBroker,
    state_dir: Path,
    devices: int,
    per_device: int,
    topics: Topics,
    *,
    live_rounds: int,
    ingest_workers: int,
) -> dict[str, Any]:
    n = devices * per_device
    # The workers' sessions join the shared subscription here, before the backlog.
    stack = DevStack.start(
        state_dir / "stack",
        broker=broker.endpoint(),
        config_overrides={"ingest_workers": ingest_workers},
    )
    running: DevStack | None = stack
    try:
        client = Client.connect(stack.server, stack.admin_token)
        try:
            profiles = compose_fleet(
                devices, models=MODELS, regions=REGIONS, firmware="4.2.0", prefix="ing"
            )
            accounts, _url, _root = provision(client.channel, stack.admin_token, profiles)
            sha = publish_bundle(
                client, stack, state_dir, feature="bench-ingest", version="1.0.0", size=4096
            ).sha256
            created = create_rollout(
                client, feature="bench-ingest", version="1.0.0", stages_ppm=[1_000_000]
            )
            client.rollouts.StartRollout(
                rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
                metadata=client.metadata,
            )

            def exposed() -> bool:
                r = client.rollouts.GetRollout(
                    rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
                    metadata=client.metadata,
                )
                return bool(r.exposed >= devices)

            wait_until(
                exposed, what="the rollout to expose every device", timeout=120, interval=0.1
            )
            # The backlog goes to the workers' sessions, which must hold the subscription.
            if not stack.control_plane.ingest.wait_ready(120):
                raise TimeoutError("the ingest workers did not subscribe within 120 s")
        finally:
            client.close()
        config = stack.control_plane.config
        running = None
        stack.stop()  # the session and its shared subscription stay at the broker

        def publish_round(first_seq: int) -> tuple[float, float]:
            """Every device publishes `per_device` events of the rollout, from `first_seq`."""
            return _publish(
                broker,
                accounts,
                per_device,
                topics,
                rollout_id=created.rollout_id,
                feature="bench-ingest",
                version="1.0.0",
                sha256=sha,
                first_seq=first_seq,
            )

        connect_s, publish_s = publish_round(1)
        log(f"control plane backlog: {n:,} events from {devices} devices in {publish_s:.2f} s")

        accounts_file = MosquittoAccounts(
            broker.files.password_file, None, reload=broker.process.reload
        )
        plane = ControlPlane.build(config, accounts=accounts_file)
        ingest = plane.ingest
        # Count the in-process ingester's transactions (one per batch), to report
        # batch sizes (worker processes' batches are not seen here).
        batches: list[int] = []
        process = plane.ingester._process

        def counted(batch: list[Any]) -> None:
            batches.append(len(batch))
            process(batch)

        plane.ingester._process = counted  # type: ignore[method-assign]
        rss_before = rss_kib()
        cpu0 = _cpu_seconds([])
        t0 = time.perf_counter()
        plane.start()
        running = DevStack(stack.state_dir, stack.keys, stack.broker, plane, stack.admin_token)
        started = time.perf_counter()
        first = wait_until(lambda: ingest.stored > 0, what="the first stored event", timeout=60)
        at_first = ingest.stored
        done = wait_until(
            lambda: ingest.stored >= n,
            what=f"{n} stored events",
            timeout=max(180.0, n / 500),
            interval=0.01,
        )
        # The workers' CPU is read while they run: the control plane's whole cost.
        cpu_s = _cpu_seconds(list(ingest.pids().values())) - cpu0
        rss_after = rss_kib()
        stored_drain = ingest.stored
        # The same devices send as many events again, live, round after round (six in a
        # full run: RSS levelled off after the third in measurements): a control
        # plane whose memory is bounded stops growing once its pools and caches are full.
        rss_rounds = [rss_after]
        for round_no in range(1, live_rounds + 1):
            publish_round(round_no * per_device + 1)
            goal = (round_no + 1) * n
            wait_until(
                lambda: ingest.stored >= goal,  # noqa: B023 (called in this round)
                what=f"{goal} stored events",
                timeout=max(180.0, n / 500),
                interval=0.05,
            )
            rss_rounds.append(rss_kib())
        with plane.store.transaction() as session:
            rows = session.exec(select(func.count()).select_from(DeviceEventRow)).one()
            state = session.get(RolloutRow, created.rollout_id)
            rollout_state = state.state if state is not None else ""
        return {
            "events": n,
            "stored": stored_drain,
            "stored_with_live_rounds": ingest.stored,
            "device_event_rows": int(rows),  # every round
            "dropped": dict(ingest.dropped),
            "seconds": done - t0,
            "cpu_s": cpu_s,
            "cpu_us_per_event": cpu_s / n * 1e6,
            "events_per_s": n / (done - t0),
            "startup_s": started - t0,
            "steady_events_per_s": (n - at_first) / (done - first) if done > first else None,
            "publish_s": publish_s,
            "publish_events_per_s": n / publish_s,
            "connect_s": connect_s,
            "rss_before_kib": rss_before,
            "rss_after_kib": rss_after,
            "rss_after_each_live_round_kib": rss_rounds[1:],
            "rss_growth_kib_per_1000_events_last_round": (
                (rss_rounds[-1] - rss_rounds[-2]) * 1000 / n if live_rounds else None
            ),
            "rss_peak_kib": hwm_kib(),
            "rollout_state_after": rollout_state,
            "batch_size_configured": config.ingest_batch_size,
            "ingest_workers": ingest_workers,
            "batches": len(batches),
            "mean_batch": sum(batches) / len(batches) if batches else None,
            "max_batch": max(batches, default=0),
        }
    finally:
        if running is not None:
            running.stop()


def run(quick: bool, *, ingest_workers: int = 2) -> Result:
    devices, per_device = (50, 100) if quick else (1000, 100)
    n = devices * per_device
    topics = Topics()
    with tempfile.TemporaryDirectory(prefix="ota-bench-ingest-") as tmp:
        broker = start_broker(
            Path(tmp) / "broker",
            extra_users=(COUNTER_USER,),
            max_queued_messages=n + 10_000,
        )
        try:
            base = _baseline(broker, devices, per_device, topics)
            log(
                f"baseline counter: {base['events']:,} events in {base['seconds']:.2f} s "
                f"= {base['events_per_s']:,.0f}/s"
            )
            real = _measured(
                broker,
                Path(tmp),
                devices,
                per_device,
                topics,
                live_rounds=1 if quick else 6,
                ingest_workers=ingest_workers,
            )
            log(
                f"control plane: {real['stored']:,} events stored in {real['seconds']:.2f} s "
                f"= {real['events_per_s']:,.0f}/s (startup {real['startup_s']:.2f} s, steady "
                f"{real['steady_events_per_s'] or 0:,.0f}/s); rows {real['device_event_rows']:,} after every round"
            )
            log(
                f"CPU per event: control plane {real['cpu_us_per_event']:.0f} µs "
                f"(its workers included), counting subscriber {base['cpu_us_per_event']:.0f} µs"
            )
            log(
                f"control plane RSS: {real['rss_before_kib'] / 1024:.1f} MiB before, "
                f"{real['rss_after_kib'] / 1024:.1f} MiB after "
                f"(peak {real['rss_peak_kib'] / 1024:.1f} MiB); after each further round of "
                f"{n:,} events from the same devices, live: "
                + ", ".join(f"{k / 1024:.1f}" for k in real["rss_after_each_live_round_kib"])
                + " MiB"
            )
        finally:
            broker.stop()
    rate, base_rate = real["events_per_s"], base["events_per_s"]
    r = ratio(rate, base_rate)
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(rate, "events/s", "events persisted by the control plane"),
        baseline=Figure(base_rate, "events/s", "events counted by a bare paho subscriber"),
        ratio=r,
        targets=[
            Target(">= 0.7 of baseline", r is not None and r >= 0.7),
            Target(">= 10 000 events/s on SQLite", rate >= 10_000),
        ],
        details={
            "devices": devices,
            "events_per_device": per_device,
            "events": n,
            "baseline": base,
            "control_plane": real,
        },
    )
