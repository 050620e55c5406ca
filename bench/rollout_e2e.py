"""rollout-e2e: N simulated devices, one 3-stage rollout with zero soak, to COMPLETED.

A DevStack on a private broker, a SimulatedFleet of N devices (each its own
MQTT connection and credentials, verifying desired states and bundles with
the device-side TUF code), a signed bundle, and a rollout 1 % → 10 % → 100 %
with no soak. The broker runs the generated config except max_queued_messages,
raised from 1 000 to 1 000 000 (`--broker-max-queued`; see below). The fleet
runs in a child process (as devices would be other machines;
`--fleet-in-process` puts it in this one). Measured: StartRollout
until the rollout is COMPLETED, which the engine declares only once every
exposed device has reported a final state, i.e. 100 % installed and
reported. The state is read from the rollout's row every 20 ms;
`--watch` follows WatchRollout instead, which costs the control plane a
full recomputation of the rollout per update.

Baseline (PROTOCOL §9): the sum of the notify, download and ingest baselines
for the same work —

- notify: measured here after the rollout, with the fleet stopped: the same N
  device accounts connect as bare MQTT clients and one control-side client
  publishes one retained message to each device's `desired` topic; first
  publish to last delivery;
- download: N x bundle bytes at the raw loopback socket + SHA-256 rate of the
  `download` benchmark;
- ingest: the events the devices sent, at the bare paho subscriber rate of
  the `telemetry-ingest` benchmark.

With the shipped max_queued_messages of 1 000, Mosquitto drops events for the
control plane's session whenever ingest lags that far behind (it logs
"Outgoing messages are being dropped for client ota-control"). Drops were
also seen with the raised limit on larger fleets (see docs/PERFORMANCE.md).
Devices whose final events are lost never finish, so the rollout never
completes: this benchmark then stops after STALL_S seconds without a stored
event and says so, with the device states and the broker's log line.

The last two come from this run when those benchmarks ran before this one
(`--only download --only telemetry-ingest --only rollout-e2e` runs them);
otherwise the baseline and the ratio are n/a, never borrowed from an older
run's results.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import case, distinct, func, select
from sqlmodel import col

from bench._client import settled_outcomes, wait_following
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
    machine_info,
    publish_bundle,
    rss_kib,
)
from bench.mqtt_tools import broadcast_baseline
from device_sim.fleet import FleetSettings, SimulatedFleet, provision
from device_sim.profile import FailureProfile, compose_fleet
from ota.client import Client
from ota.domain.states import COMPLETED, PAUSED, ROLLOUT_FINAL
from ota.store import rollouts
from ota.store.models import DeviceEventRow, RolloutDeviceRow, RolloutRow
from ota.store.session import Store
from ota.transport.topics import Topics
from ota.v1 import report_pb2, rollout_pb2

NAME = "rollout-e2e"
NOTIFY_USER = "bench-notify"
STAGES = [10_000, 100_000, 1_000_000]
BUNDLE_BYTES = 64 * 1024
MIB = 1024 * 1024
TARGET_DEVICES = 10_000
TARGET_SECONDS = 15.0
STALL_S = 60.0
RSS_EVERY_S = 1.0  # how often the control plane's RSS is sampled during a rollout
# The broker's per-session queue limit for this benchmark; None: the shipped config.
BENCH_MAX_QUEUED = 1_000_000
FINAL = {
    rollout_pb2.ROLLOUT_STATE_COMPLETED,
    rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
    rollout_pb2.ROLLOUT_STATE_ABORTED,
    rollout_pb2.ROLLOUT_STATE_PAUSED,
}


def _earlier_baseline(earlier: dict[str, Result], name: str) -> tuple[float | None, str]:
    """The baseline figure of another benchmark from this run, or None (printed as n/a).

    Never from an older results file: a baseline from another run, on another
    load, would make the ratio meaningless.
    """
    if name in earlier and earlier[name].baseline.value:
        return earlier[name].baseline.value, "this run"
    return None, f"n/a: {name} did not run before this benchmark in this run"


def _watch(
    client: Client, rollout_id: str, t0: float, timeout: float
) -> tuple[str, list[dict[str, Any]]]:
    """Follow the rollout with WatchRollout until a final state; note each stage start."""
    marks: list[dict[str, Any]] = []
    state = "UNKNOWN"
    stage = -2
    for update in client.rollouts.WatchRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id),
        metadata=client.metadata,
        timeout=timeout,
    ):
        last = update.rollout
        state = rollout_pb2.RolloutState.Name(last.state).removeprefix("ROLLOUT_STATE_")
        if last.current_stage != stage:
            stage = last.current_stage
            marks.append({"stage": stage, "at_s": time.perf_counter() - t0})
        if last.state in FINAL:
            break
    return state, marks


def _poll(
    store: Store,
    rollout_id: str,
    t0: float,
    timeout: float,
    *,
    progress: Callable[[], int],
    stalled: Callable[[], str],
    backlog: Callable[[], int],
    seen: dict[str, int],
    rss_samples: list[tuple[float, int, int]],
) -> tuple[str, list[dict[str, Any]]]:
    """Read the rollout's row every 20 ms until a final state; note each stage start.

    A primary-key read, so observing costs the control plane next to nothing
    (WatchRollout recomputes the whole rollout, eligible fleet included, per
    update). Gives up when no event has been stored for STALL_S seconds.
    Records in `seen` the largest backlog seen in the ingester's inbox, and in
    `rss_samples` (time, events stored, this process's RSS in KiB) every
    RSS_EVERY_S seconds: the control plane's memory while the fleet reports.
    """
    marks: list[dict[str, Any]] = []
    stage = -2
    deadline = time.perf_counter() + timeout
    last_progress, last_change = progress(), time.perf_counter()
    pause = threading.Event()
    while time.perf_counter() < deadline:
        with store.transaction() as session:
            row = session.get(RolloutRow, rollout_id)
            state, current = (row.state, row.current_stage) if row else ("UNKNOWN", -1)
        now = time.perf_counter()
        seen["max_inbox"] = max(seen.get("max_inbox", 0), backlog())
        if not rss_samples or now - rss_samples[-1][0] >= RSS_EVERY_S:
            rss_samples.append((now, progress(), rss_kib()))
        if current != stage:
            stage = current
            marks.append({"stage": stage, "at_s": now - t0})
        if state in ROLLOUT_FINAL or state == PAUSED:
            return state, marks
        if (p := progress()) != last_progress:
            last_progress, last_change = p, now
        elif now - last_change > STALL_S:
            raise RuntimeError(
                f"the rollout stalled in {state} at stage {current + 1}: no event stored for "
                f"{STALL_S:.0f} s after {now - t0:.0f} s. {stalled()}"
            )
        pause.wait(0.02)
    raise TimeoutError(f"the rollout did not finish within {timeout:.0f}s")


def _memory(samples: list[tuple[float, int, int]], fleet_in_process: bool) -> dict[str, Any]:
    """The control plane's RSS over the rollout, and its growth per event late on.

    Bounded memory shows as a second-half slope near zero: caches and pools
    fill during the first stage, then stored events must not cost memory.
    Empty when the fleet shares this process (its RSS would be mixed in).
    """
    if fleet_in_process or len(samples) < 4:
        return {}
    half = samples[len(samples) // 2 :]
    events = half[-1][1] - half[0][1]
    slope = (half[-1][2] - half[0][2]) * 1000 / events if events > 0 else 0.0
    return {
        "start_kib": samples[0][2],
        "peak_kib": max(r for _t, _e, r in samples),
        "end_kib": samples[-1][2],
        "events": samples[-1][1] - samples[0][1],
        "second_half_kib_per_1000_events": slope,
        "samples": [(round(t - samples[0][0], 1), e, r) for t, e, r in samples],
    }


def _control_log(log_file: Path) -> list[str]:
    """What the broker logged about the control plane's connection (for diagnosis)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines if "ota-control" in line][-20:]


def _broker_drops(log_file: Path) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    drops = [line for line in text.splitlines() if "messages are being dropped" in line]
    if not drops:
        return "The broker logged no dropped messages."
    return (
        f"The broker logged {drops[0]!r}: it discarded messages meant for the control "
        "plane's session, so some devices' events never reached the store."
    )


def _settle(count: Callable[[], int], quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The count once it has not changed for `quiet` seconds (late events drain)."""
    deadline = time.perf_counter() + timeout
    last, since = count(), time.perf_counter()
    pause = threading.Event()
    while time.perf_counter() < deadline:
        pause.wait(0.1)
        now = count()
        if now != last:
            last, since = now, time.perf_counter()
        elif time.perf_counter() - since >= quiet:
            break
    return last


def _progress_text(store: Store, rollout_id: str) -> str:
    with store.transaction() as session:
        counts = rollouts.state_counts(session, rollout_id)
    return "Device states: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "."


class _InProcessFleet:
    """The fleet in this process: devices share the GIL with the control plane."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self._fleet = SimulatedFleet(
            compose_fleet(spec["devices"], models=MODELS, regions=REGIONS, firmware="4.2.0"),
            FleetSettings(
                server=spec["server"],
                admin_token=spec["token"],
                trusted_root=Path(spec["root"]).read_bytes(),
                state_dir=Path(spec["state_dir"]),
                failures=FailureProfile(),
            ),
        )

    def start(self, timeout: float) -> dict[str, Any]:
        rss0 = rss_kib()
        t0 = time.perf_counter()
        self._fleet.start(timeout=timeout)
        start_s = time.perf_counter() - t0
        return {
            "start_s": start_s,
            "following_s": wait_following(self._fleet, timeout),
            "register_s": None,
            "rss_delta_kib": rss_kib() - rss0,
            "cpu_s": None,
        }

    def finish(self, rollout_id: str, expect: dict[str, int]) -> dict[str, Any]:
        outcomes, waited = settled_outcomes(self._fleet, rollout_id, expect)
        out = {
            "outcomes": outcomes,
            "settle_s": waited,
            "events_sent": sum(d.record.events_sent for d in self._fleet.devices),
            "cpu_s": None,
        }
        self.close()
        return out

    def close(self) -> None:
        if self._fleet is not None:
            fleet, self._fleet = self._fleet, None  # type: ignore[assignment]
            fleet.stop()


class _ChildFleet:
    """The fleet in a child process (`python -m bench._client fleet`), as devices would be."""

    def __init__(self, spec: dict[str, Any], work: Path) -> None:
        self._spec_file = work / "fleet.json"
        self._spec_file.write_text(json.dumps(spec))
        self._log = work / "fleet.log"
        self._proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float) -> dict[str, Any]:
        with self._log.open("w") as err:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench._client", "fleet", "--spec", str(self._spec_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        return self._line(timeout)

    def _line(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._proc.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not box or not box[0].strip():
            tail = self._log.read_text()[-2000:]
            raise RuntimeError(f"the fleet process did not answer within {timeout:.0f}s:\n{tail}")
        parsed: dict[str, Any] = json.loads(box[0])
        return parsed

    def finish(self, rollout_id: str, expect: dict[str, int]) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"rollout_id": rollout_id, "expect": expect}) + "\n")
        self._proc.stdin.flush()
        out = self._line(240)
        self._proc.wait(timeout=60)
        return out

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _stage_timings(store: Store, rollout_id: str) -> list[dict[str, Any]]:
    """Per stage: exposure to the last NOTIFIED and the last ACTIVE event stored.

    The first is the notify-fleet figure of PROTOCOL §9 (desired state signed,
    delivered and verified by the device, which then reports NOTIFIED), plus
    the ingest lag; both use the control plane's clock.
    """
    rd, ev = RolloutDeviceRow, DeviceEventRow
    query = (
        select(
            col(rd.stage),
            func.count(distinct(col(rd.device_id))),
            func.min(col(rd.exposed_at)),
            func.max(case((col(ev.state) == "NOTIFIED", col(ev.received_at)))),
            func.max(case((col(ev.state) == "ACTIVE", col(ev.received_at)))),
        )
        .join(
            ev,
            (col(ev.device_id) == col(rd.device_id)) & (col(ev.rollout_id) == col(rd.rollout_id)),
        )
        .where(col(rd.rollout_id) == rollout_id)
        .group_by(col(rd.stage))
        .order_by(col(rd.stage))
    )
    out = []
    with store.transaction() as session:
        for stage, devices, exposed, notified, active in session.execute(query):
            out.append(
                {
                    "stage": stage,
                    "devices": devices,
                    "notified_s": (notified - exposed).total_seconds() if notified else None,
                    "active_s": (active - exposed).total_seconds() if active else None,
                }
            )
    return out


def run(
    quick: bool,
    *,
    earlier: dict[str, Result],
    devices: int | None = None,
    fleet_in_process: bool = False,
    watch: bool = False,
    broker_max_queued: int | None = BENCH_MAX_QUEUED,
    publish_connections: int | None = None,
) -> Result:
    n = devices or (200 if quick else 2000)
    topics = Topics()
    # Applied to the broker's config (0: no limit); None keeps the shipped value.
    broker_settings: dict[str, Any] = (
        {} if broker_max_queued is None else {"max_queued_messages": broker_max_queued}
    )
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-e2e-") as tmp,
        bench_stack(
            Path(tmp),
            extra_users=(NOTIFY_USER,),
            publish_connections=publish_connections,
            **broker_settings,
        ) as (stack, broker),
    ):
        timeout = max(120.0, n / 20)
        spec: dict[str, Any] = {
            "server": stack.server,
            "token": stack.admin_token,
            "root": str(stack.keys.root_json),
            "devices": n,
            "models": MODELS,
            "regions": REGIONS,
            "state_dir": str(Path(tmp) / "devices"),
            "timeout": timeout,
        }
        fleet: _InProcessFleet | _ChildFleet = (
            _InProcessFleet(spec) if fleet_in_process else _ChildFleet(spec, Path(tmp))
        )
        try:
            broker_rss0 = rss_kib(broker.process.pid)
            ready = fleet.start(timeout=timeout + 30)
            broker_rss = rss_kib(broker.process.pid)
            log(
                f"{n} devices registered, connected and subscribed in {ready['start_s']:.2f} s "
                + (
                    f"(of which registration {ready['register_s']:.2f} s) "
                    if ready["register_s"] is not None
                    else ""
                )
                + f"in {'this' if fleet_in_process else 'a child'} process, "
                f"+{ready['rss_delta_kib'] / 1024:.0f} MiB RSS; all following their "
                f"desired-state topic {ready['following_s']:.2f} s later"
            )
            client = Client.connect(stack.server, stack.admin_token)
            try:
                publish_bundle(
                    client,
                    stack,
                    Path(tmp),
                    feature="bench-e2e",
                    version="1.0.0",
                    size=BUNDLE_BYTES,
                )
                created = create_rollout(
                    client, feature="bench-e2e", version="1.0.0", stages_ppm=STAGES
                )
                stored0 = stack.control_plane.ingester.stored
                broker_pid = broker.process.pid
                cpu0 = (cpu_s(), cpu_s(broker_pid) if broker_pid else 0.0)
                t0 = time.perf_counter()
                client.rollouts.StartRollout(
                    rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
                    metadata=client.metadata,
                )
                limit = max(300.0, n / 5)
                seen: dict[str, int] = {}
                rss_samples: list[tuple[float, int, int]] = []
                final, marks = (
                    _watch(client, created.rollout_id, t0, limit)
                    if watch
                    else _poll(
                        stack.control_plane.store,
                        created.rollout_id,
                        t0,
                        limit,
                        progress=lambda: stack.control_plane.ingester.stored,
                        stalled=lambda: (
                            _progress_text(stack.control_plane.store, created.rollout_id)
                            + " "
                            + _broker_drops(broker.files.log_file)
                        ),
                        backlog=stack.control_plane.link.inbox.qsize,
                        seen=seen,
                        rss_samples=rss_samples,
                    )
                )
                wall = time.perf_counter() - t0
                cpu1 = (cpu_s(), cpu_s(broker_pid) if broker_pid else 0.0)
                stored = stack.control_plane.ingester.stored - stored0
                ingest_dropped = dict(stack.control_plane.ingester.dropped)
                stages = _stage_timings(stack.control_plane.store, created.rollout_id)
                settled = _settle(lambda: stack.control_plane.ingester.stored) - stored0
                report = client.reports.GetRolloutReport(
                    report_pb2.GetRolloutReportRequest(rollout_id=created.rollout_id),
                    metadata=client.metadata,
                )
                reported = {c.key: c.count for c in report.current_states if c.key != "TARGETED"}
                done = fleet.finish(created.rollout_id, reported)
                # Fresh secrets for the same device ids (re-registering rotates them).
                secrets, _url, _root = provision(
                    client.channel,
                    stack.admin_token,
                    compose_fleet(n, models=MODELS, regions=REGIONS, firmware="4.2.0"),
                )
            finally:
                client.close()
        finally:
            fleet.close()
        drops = _broker_drops(broker.files.log_file)
        control_log = _control_log(broker.files.log_file)
        outcomes, events_sent = done["outcomes"], done["events_sent"]
        cpu = {
            "control_plane_process_s": cpu1[0] - cpu0[0],
            "broker_s": cpu1[1] - cpu0[1],
            # From connected to reported: includes a little idle before the start.
            "fleet_process_s": (
                done["cpu_s"] - ready["cpu_s"] if done["cpu_s"] is not None else None
            ),
        }
        log(
            "CPU during the rollout: control plane "
            f"{cpu['control_plane_process_s']:.1f} s, broker {cpu['broker_s']:.1f} s"
            + (
                f", fleet {cpu['fleet_process_s']:.1f} s"
                if cpu["fleet_process_s"] is not None
                else " (fleet in this process)"
            )
            + f" over {wall:.1f} s wall on {machine_info()['nproc']} cores"
        )
        state = final
        log(
            f"rollout {state} in {wall:.2f} s; stages started at "
            + ", ".join(f"{m['at_s']:.2f} s" for m in marks if m["stage"] >= 0)
            + f"; outcomes {outcomes}; {stored:,} events stored at completion, "
            f"{settled:,} of {events_sent:,} sent once settled"
        )
        matches = reported == outcomes
        log(
            ("report matches what the devices did: " if matches else "REPORT DIFFERS: ")
            + f"report {reported}, devices {outcomes} "
            f"({done['settle_s']:.1f} s after the report for the devices to agree)"
        )
        memory = _memory(rss_samples, fleet_in_process)
        if memory:
            log(
                f"control plane RSS while the fleet reported: {memory['start_kib'] / 1024:.0f} MiB "
                f"at the start, {memory['peak_kib'] / 1024:.0f} MiB peak, "
                f"{memory['end_kib'] / 1024:.0f} MiB at the end, over {memory['events']:,} "
                f"events; second half {memory['second_half_kib_per_1000_events']:+.1f} KiB "
                "per 1 000 events"
            )
        notify = broadcast_baseline(
            broker.host,
            broker.port,
            secrets,
            (NOTIFY_USER, broker.extra[NOTIFY_USER]),
            topics,
            timeout=120,
        )
        for st in stages:
            log(
                f"stage {st['stage'] + 1}: {st['devices']} devices, last NOTIFIED "
                f"{st['notified_s']:.2f} s and last ACTIVE {st['active_s']:.2f} s after exposure"
            )
        log(
            f"notify baseline: {n} retained per-device publishes delivered in "
            f"{notify['notify_s']:.3f} s"
        )
    if final != COMPLETED:
        raise RuntimeError(f"the rollout ended {state}, not COMPLETED")
    if not matches:
        raise RuntimeError(f"the report {reported} differs from the devices' {outcomes}")

    raw_mib_s, raw_src = _earlier_baseline(earlier, "download")
    ingest_rate, ingest_src = _earlier_baseline(earlier, "telemetry-ingest")
    parts: dict[str, Any] = {"notify_s": notify["notify_s"], "notify_source": "this run"}
    parts["download_s"] = n * BUNDLE_BYTES / MIB / raw_mib_s if raw_mib_s else None
    parts["download_source"] = raw_src
    parts["ingest_s"] = events_sent / ingest_rate if ingest_rate else None
    parts["ingest_source"] = ingest_src
    known = [parts[k] for k in ("notify_s", "download_s", "ingest_s") if parts[k] is not None]
    complete = len(known) == 3
    base = sum(known) if complete else None
    r = wall / base if base else None
    per_10k = wall * TARGET_DEVICES / n
    targets = [
        Target(
            f"{TARGET_DEVICES} devices in <= {TARGET_SECONDS:.0f} s",
            wall <= TARGET_SECONDS if n >= TARGET_DEVICES else None,
            ""
            if n >= TARGET_DEVICES
            else f"ran {n} devices; linear projection to {TARGET_DEVICES}: {per_10k:.0f} s",
        ),
        Target(
            "within 2x of the baseline sum",
            (r <= 2.0) if r is not None else None,
            "" if complete else "baseline incomplete: run telemetry-ingest and download first",
        ),
    ]
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(wall, "s", f"{n} devices, 3 stages, no soak, start to COMPLETED"),
        baseline=Figure(base, "s", "sum of notify + download + ingest baselines"),
        ratio=r,
        targets=targets,
        details={
            "devices": n,
            "stages_ppm": STAGES,
            "bundle_bytes": BUNDLE_BYTES,
            "ratio_meaning": "figure / baseline (a time: lower is better)",
            "fleet_in_process": fleet_in_process,
            "observed_with": "WatchRollout" if watch else "polling the rollout row",
            "broker_max_queued_messages": (
                "shipped default" if broker_max_queued is None else broker_max_queued
            ),
            "broker_drops": drops,
            "broker_log_control_plane": control_log,
            "max_ingest_inbox": seen.get("max_inbox"),
            "ingester_dropped": ingest_dropped,
            "cpu_s": cpu,
            "fleet_start_s": ready["start_s"],
            "fleet_following_s": ready["following_s"],
            "fleet_register_s": ready["register_s"],
            "fleet_rss_kib_per_device": ready["rss_delta_kib"] / n,
            "broker_rss_kib_before_fleet": broker_rss0,
            "broker_rss_kib_fleet_connected": broker_rss,
            "stage_starts": marks,
            "stage_timings": stages,
            "outcomes": outcomes,
            "report_states": reported,
            "report_matches_devices": matches,
            "devices_settle_s": done["settle_s"],
            "control_plane_memory": memory,
            "events_sent": events_sent,
            "events_stored_at_completion": stored,
            "events_stored_after_settling": settled,
            "events_lost": events_sent - settled,
            "events_per_s_during_rollout": stored / wall,
            "baseline_parts": parts,
            "notify_baseline_connect_s": notify["connect_s"],
            "projected_s_for_10000": per_10k,
        },
    )
