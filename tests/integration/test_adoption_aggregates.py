"""Aggregates kept on ingest equal a recount of the progress rows, whatever the event order."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from ota.domain import states
from ota.store import fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.ingest import HealthFigures, IncomingEvent, ingest_events
from ota.store.models import AdoptionStatRow, RolloutDeviceRow, RolloutRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 5, 1, tzinfo=UTC)
PATH = ["NOTIFIED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "INSTALLED", "ACTIVE"]


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    engine = open_database(database_url)
    migrate(engine)
    yield Store(engine)
    engine.dispose()


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
    steps = PATH[:stop]
    if rng.random() < 0.3 and stop < len(PATH):
        steps.append("FAILED")
    if rng.random() < 0.2:
        steps.append("ROLLED_BACK")
    out = []
    for seq, state in enumerate(steps, start=1):
        health = HealthFigures(rng.randrange(2), 0, 60) if state == "ACTIVE" else None
        reason = "INSTALL_FAILED" if state == "FAILED" else ""
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
    assert total("failed") == +Counter(r.reason for r in rows if r.reason)
    for step in states.FUNNEL[1:]:
        reached = sum(r.furthest_rank >= states.RANK[step] for r in rows)
        assert total("reached")[step] == reached, step
        assert total("step_time")[step] == reached, step
    assert total("latency")["ACTIVE"] == sum(r.active_at is not None for r in rows)
    assert total("health")["samples"] == sum(e.health is not None for e in events)
