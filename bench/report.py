"""report: adoption report latency at 1 M events vs a plain GROUP BY over the events.

A SQLite store is filled in this process: devices registered and a rollout
created and exposed with the store functions (no broker, no engine, no
signing), then device events ingested with `ota.store.ingest.ingest_events`
in large batches, as telemetry arrives: round after round, every device sends
its next event (the funnel NOTIFIED → ACTIVE, a few failures, then health
samples). Ingest maintains the aggregates the report reads.

The figure is the median latency of `build_report` (the whole adoption
report, fresh session each call). The rollout's eligible count is recorded on
its row once after exposure, as the engine's tick does for a running rollout;
`eligible_count_ms` is what counting it on demand costs, and `draft_report_ms`
the whole report of a draft rollout of the same bundle, which counts it on demand. The baseline is the query a report without
aggregates would start from: state counts by a plain `GROUP BY` over the
`device_event` table of the rollout. Both run against the same file.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from sqlalchemy import text
from sqlmodel import col, select

from bench.common import MODELS, REGIONS, Figure, Result, Target, log, ratio
from ota.clock import ManualClock
from ota.domain.plan import RolloutPlan, Stage, install_failure_gate
from ota.reports import model as report_model
from ota.rollout.commands import NewRollout, RolloutCommands
from ota.rollout.exposure import eligible_count
from ota.store import bundles, fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.ingest import HealthFigures, IncomingEvent, ingest_events
from ota.store.models import DeviceRow
from ota.store.session import Store
from ota.trust.director import Director

NAME = "report"
FEATURE = "bench-report"
VERSION = "1.0.0"
FIRMWARES = ["4.0.0", "4.1.2", "4.2.0", "5.0.1"]
# Events per device: the five funnel steps, then health samples while active.
EVENTS_PER_DEVICE = 10
FUNNEL = ("NOTIFIED", "DOWNLOADED", "VERIFIED", "INSTALLED", "ACTIVE")
FAIL_EVERY = 50  # one device in 50 fails verification and sends nothing after
BATCH = 20_000  # events per ingest transaction
REGISTER_BATCH = 10_000


def _event(device_id: str, seq: int, rollout_id: str, when: datetime) -> IncomingEvent | None:
    index = int(device_id[1:])
    fails = index % FAIL_EVERY == 0
    if seq <= len(FUNNEL):
        state = FUNNEL[seq - 1]
        if fails and state == "VERIFIED":
            state = "FAILED"
        elif fails and seq > 3:
            return None
        health = None
    elif fails:
        return None
    else:
        state = "ACTIVE"
        health = HealthFigures(
            crashes=1 if (index + seq) % 97 == 0 else 0, feature_errors=0, uptime_seconds=60 * seq
        )
    return IncomingEvent(
        device_id=device_id,
        seq=seq,
        rollout_id=rollout_id,
        feature=FEATURE,
        version=VERSION,
        state=state,
        error_code="bad_signature" if state == "FAILED" else "",
        detail="",
        bundle_sha256="00" * 32,
        device_time=when,
        health=health,
    )


def _build(store: Store, devices: int) -> tuple[str, str, dict[str, float]]:
    """Register, create, expose, ingest; returns the rollout's and a draft's ids, phase seconds."""
    clock = ManualClock()
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    ids = [f"d{i:07d}" for i in range(devices)]
    with store.transaction() as session:
        bundles.add_bundle(
            session,
            feature=FEATURE,
            version=VERSION,
            target_path=f"features/{FEATURE}/{VERSION}.bundle",
            sha256="00" * 32,
            length=10,
            models=MODELS,
            min_firmware="4.0",
            signer_keyids=[],
            request_id=None,
            now=clock.now(),
        )
    for start in range(0, devices, REGISTER_BATCH):
        with store.transaction() as session:
            fleet.register_devices(
                session,
                [
                    fleet.Registration(
                        device_id,
                        MODELS[i % len(MODELS)],
                        REGIONS[i % len(REGIONS)],
                        FIRMWARES[i % len(FIRMWARES)],
                        {"ring": "beta" if i % 10 == 0 else "prod"},
                    )
                    for i, device_id in enumerate(ids[start : start + REGISTER_BATCH], start)
                ],
                clock.now(),
            )
    phases["register_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    director = Director(CryptoSigner.generate_ed25519())
    commands = RolloutCommands(
        store, director, clock, desired_ttl=timedelta(days=1), on_change=lambda: None
    )
    plan = RolloutPlan(
        (Stage(ppm=1_000_000, min_soak_seconds=0),),
        (install_failure_gate(max_failure_ppm=100_000, min_sample=5, action="pause"),),
    )
    rollout_id = commands.create(
        NewRollout(FEATURE, VERSION, "", plan, ""), actor="bench"
    ).rollout_id
    # A second rollout of the same bundle stays a DRAFT: its report counts the eligible
    # devices on demand, as an operator reviewing a draft sees it.
    draft_id = commands.create(NewRollout(FEATURE, VERSION, "", plan, ""), actor="bench").rollout_id
    with store.transaction() as session:
        row = rollouts.get_rollout(session, rollout_id)
        rollouts.set_quietly(session, row, state="RUNNING", current_stage=0)
    for start in range(0, devices, REGISTER_BATCH):
        with store.transaction() as session:
            batch = session.exec(
                select(DeviceRow).where(
                    col(DeviceRow.device_id).in_(ids[start : start + REGISTER_BATCH])
                )
            ).all()
            rollouts.expose(session, rollout_id, batch, 0, clock.now())
    with store.transaction() as session:
        # What the engine's tick records for a running rollout (no engine runs here).
        row = rollouts.get_rollout(session, rollout_id)
        counted = eligible_count(session, row, bundles.get_bundle(session, row.bundle_name))
        rollouts.set_quietly(session, row, eligible=counted)
    phases["expose_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stored = 0
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for seq in range(1, EVENTS_PER_DEVICE + 1):
        when = base + timedelta(minutes=5 * seq)
        events = [e for d in ids if (e := _event(d, seq, rollout_id, when)) is not None]
        for start in range(0, len(events), BATCH):
            with store.transaction() as session:
                stored += ingest_events(session, events[start : start + BATCH], when).stored
        log(f"round {seq}/{EVENTS_PER_DEVICE}: {stored:,} events stored")
    phases["ingest_s"] = time.perf_counter() - t0
    phases["events"] = stored
    return rollout_id, draft_id, phases


def _median_ms(call: Callable[[], object], runs: int) -> tuple[float, list[float]]:
    call()  # warm the page cache and the statement caches
    times: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), [round(t, 2) for t in times]


def run(quick: bool) -> Result:
    devices = 2_000 if quick else 100_000
    runs = 5 if quick else 21
    with tempfile.TemporaryDirectory(prefix="ota-bench-report-") as tmp:
        db = open_database(f"sqlite:///{Path(tmp) / 'ota.db'}")
        try:
            migrate(db)
            store = Store(db)
            rollout_id, draft_id, phases = _build(store, devices)
            now = datetime(2026, 1, 1, 2, tzinfo=UTC)

            def report() -> report_model.AdoptionReport:
                with store.transaction() as session:
                    return report_model.build_report(session, rollout_id, now)

            def draft_report() -> report_model.AdoptionReport:
                with store.transaction() as session:
                    return report_model.build_report(session, draft_id, now)

            def group_by() -> list[Any]:
                with store.transaction() as session:
                    return list(
                        session.execute(
                            text(
                                "SELECT state, COUNT(*) FROM device_event "
                                "WHERE rollout_id = :r GROUP BY state"
                            ),
                            {"r": rollout_id},
                        )
                    )

            def eligible() -> int:
                with store.transaction() as session:
                    row = rollouts.get_rollout(session, rollout_id)
                    return eligible_count(
                        session, row, bundles.get_bundle(session, row.bundle_name)
                    )

            # Alternate so that drift on the machine touches both alike.
            report_ms, report_runs = _median_ms(report, runs)
            base_ms, base_runs = _median_ms(group_by, max(3, runs // 3))
            eligible_ms, _ = _median_ms(eligible, runs)
            draft_ms, draft_runs = _median_ms(draft_report, runs)
            built = report()
            draft = draft_report()
            log(
                f"report {report_ms:.1f} ms (eligible count {eligible_ms:.1f} ms; a draft's "
                f"report, counting on demand, {draft_ms:.1f} ms), "
                f"GROUP BY {base_ms:.1f} ms over {phases['events']:,.0f} events"
            )
        finally:
            db.dispose()
    speedup = ratio(base_ms, report_ms)
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(report_ms, "ms", f"adoption report at {phases['events']:,.0f} events"),
        baseline=Figure(base_ms, "ms", "state counts by GROUP BY over device_event"),
        ratio=speedup,
        targets=[
            Target(">= 50x faster than baseline", speedup is not None and speedup >= 50),
            Target("< 100 ms", report_ms < 100),
            Target(
                "a draft's report (eligible counted on demand) < 100 ms",
                draft_ms < 100,
                f"{draft_ms:.1f} ms",
            ),
        ],
        details={
            "devices": devices,
            "events": phases["events"],
            "events_per_device": EVENTS_PER_DEVICE,
            "runs": runs,
            "report_runs_ms": report_runs,
            "baseline_runs_ms": base_runs,
            "eligible_count_ms": eligible_ms,
            "draft_report_ms": draft_ms,
            "draft_report_runs_ms": draft_runs,
            "draft_eligible": draft.eligible,
            "report_eligible": built.eligible,
            "report_exposed": built.exposed,
            "report_events_ingested": built.events_ingested,
            "build_phases_s": {k: round(v, 2) for k, v in phases.items() if k != "events"},
            "ingest_events_per_s": round(phases["events"] / phases["ingest_s"]),
            "note": "ratio is baseline / report (how many times faster the report is)",
        },
    )
