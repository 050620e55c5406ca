"""Aggregates kept on ingest equal a recount of the progress rows, whatever the event order."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from ota.domain import states
from ota.domain.progress import counted_failure
from ota.rollout.progress import read_progress
from ota.store import fleet, rollouts
from ota.store.ingest import HealthFigures, IncomingEvent, ingest_events
from ota.store.models import AdoptionStatRow, RolloutDeviceRow, RolloutRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 5, 1, tzinfo=UTC)
PATH = ["NOTIFIED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "INSTALLED", "ACTIVE"]


def _setup(store: Store, n: int) -> None:
    with store.transaction() as session:
        fleet.register_devices(
            session,
            [fleet.Registration(f"d{i}", ("ev6", "ev9")[i % 2], "eu", "4.2", {}) for i in range(n)],
            NOW,
        )
        session.add(
            RolloutRow(
                rollout_id="r-1",
                feature="f",
                version="1.0",
                bundle_name="bundles/f/1.0",
                stages_json="[]",
                gate_json="{}",
                state=states.RUNNING,
                salt_hex="00",
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.flush()
        devices = [fleet.get_device(session, f"d{i}") for i in range(n)]
        rollouts.expose(session, "r-1", devices, 0, NOW)


def _events(rng: random.Random, device: str) -> list[IncomingEvent]:
    stop = rng.randrange(len(PATH) + 1)
    steps = [(state, "") for state in PATH[:stop]]
    if rng.random() < 0.3 and stop < len(PATH):
        steps.append(("FAILED", "INSTALL_FAILED"))
    if rng.random() < 0.3:
        # Gave up waiting for the control plane somewhere along the way: not a failure.
        steps.insert(rng.randrange(len(steps) + 1), ("FAILED", "CONTROL_PLANE_UNREACHABLE"))
    if rng.random() < 0.2:
        steps.append(("ROLLED_BACK", ""))
    out = []
    for seq, (state, reason) in enumerate(steps, start=1):
        health = HealthFigures(rng.randrange(2), 0, 60) if state == "ACTIVE" else None
        when = NOW + timedelta(seconds=seq * rng.random() * 10)
        out.append(
            IncomingEvent(device, seq, "r-1", "f", "1.0", state, reason, "", "", when, health)
        )
    return out


@pytest.mark.parametrize("seed", range(5))
def test_aggregates_equal_a_recount_of_the_progress_rows(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    _setup(store, 30)
    events = [e for i in range(30) for e in _events(rng, f"d{i}")]
    # Shuffled, in batches, with every fifth event sent twice.
    sent = events + events[::5]
    rng.shuffle(sent)
    for i in range(0, len(sent), 17):
        with store.transaction() as session:
            ingest_events(session, sent[i : i + 17], NOW + timedelta(seconds=30))
    with store.transaction() as session:
        stats = list(session.exec(select(AdoptionStatRow)))
        rows = list(session.exec(select(RolloutDeviceRow)))

    def total(metric: str) -> Counter[str]:
        out: Counter[str] = Counter()
        for s in stats:
            if s.metric == metric:
                out[s.key] += s.value
        return +out

    assert total("events") == Counter({"stored": len(events)})
    assert total("state") == +Counter(r.state for r in rows if r.state != "TARGETED")
    assert total("failed") == Counter(
        counted_failure(r.reason) for r in rows if counted_failure(r.reason)
    )
    assert "CONTROL_PLANE_UNREACHABLE" not in total("failed")
    for step in states.FUNNEL[1:]:
        reached = sum(r.furthest_rank >= states.RANK[step] for r in rows)
        assert total("reached")[step] == reached, step
        assert total("step_time")[step] == reached, step
    assert total("latency")["ACTIVE"] == sum(r.active_at is not None for r in rows)
    assert total("health")["samples"] == sum(e.health is not None for e in events)


def test_giving_up_on_the_control_plane_keeps_a_device_in_flight_and_uncounted(
    store: Store,
) -> None:
    _setup(store, 2)

    def send(device: str, seq: int, state: str, reason: str = "") -> None:
        event = IncomingEvent(device, seq, "r-1", "f", "1.0", state, reason, "", "", NOW)
        with store.transaction() as session:
            ingest_events(session, [event], NOW)

    def row(device: str) -> RolloutDeviceRow:
        with store.transaction() as session:
            found = session.get(RolloutDeviceRow, ("r-1", device))
            assert found is not None
            return found

    for seq, state in enumerate(["NOTIFIED", "DOWNLOADING"], start=1):
        send("d0", seq, state)
        send("d1", seq, state)
    send("d0", 3, "FAILED", "CONTROL_PLANE_UNREACHABLE")
    send("d1", 3, "FAILED", "DOWNLOAD_FAILED")

    assert (row("d0").state, row("d0").reason) == ("DOWNLOADING", "CONTROL_PLANE_UNREACHABLE")
    with store.transaction() as session:
        p = read_progress(session, "r-1")
        failed_stats = [
            s.key for s in session.exec(select(AdoptionStatRow)) if s.metric == "failed" and s.value
        ]
    # The gate sees one failure (d1) of one finished device; d0 is still on its way.
    assert (p.failed, p.finished, p.exposed) == (1, 1, 2)
    assert failed_stats == ["DOWNLOAD_FAILED"]

    for seq, state in enumerate(PATH[2:], start=4):
        send("d0", seq, state)
    assert (row("d0").state, row("d0").reason) == ("ACTIVE", "")
