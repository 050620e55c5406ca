"""The engine against commands and failures, on a real SQLite file with a clock the test moves."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
from securesystemslib.signer import CryptoSigner

from ota.clock import ManualClock
from ota.domain import states
from ota.domain.plan import RolloutPlan, Stage, install_failure_gate
from ota.rollout.commands import NewRollout, RolloutCommands
from ota.rollout.engine import RolloutEngine
from ota.store import bundles, fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.ingest import IncomingEvent, ingest_events
from ota.store.session import Store
from ota.trust.director import Director

pytestmark = pytest.mark.integration
TTL = timedelta(days=1)


@dataclass
class Rig:
    store: Store
    clock: ManualClock
    engine: RolloutEngine
    commands: RolloutCommands


@pytest.fixture
def rig(database_url: str) -> Iterator[Rig]:
    db = open_database(database_url)
    migrate(db)
    store = Store(db)
    clock = ManualClock()
    director = Director(CryptoSigner.generate_ed25519())
    with store.transaction() as session:
        bundles.add_bundle(
            session,
            feature="f",
            version="1.0",
            target_path="features/f/1.0.bundle",
            sha256="00" * 32,
            length=10,
            models=[],
            min_firmware="",
            signer_keyids=[],
            request_id=None,
            now=clock.now(),
        )
        fleet.register_devices(
            session,
            [fleet.Registration(f"d{i:02d}", "ev6", "eu", "4.2", {}) for i in range(20)],
            clock.now(),
        )
    yield Rig(
        store,
        clock,
        RolloutEngine(store, director, clock, on_notify=lambda: None, desired_ttl=TTL),
        RolloutCommands(store, director, clock, desired_ttl=TTL, on_change=lambda: None),
    )
    db.dispose()


def _start(rig: Rig, stages: tuple[Stage, ...]) -> str:
    plan = RolloutPlan(
        stages, (install_failure_gate(max_failure_ppm=100_000, min_sample=5, action="pause"),)
    )
    row = rig.commands.create(NewRollout("f", "1.0", "", plan, ""), actor="t")
    rig.commands.run("start", row.rollout_id, actor="t", reason="")
    return row.rollout_id


def test_a_tick_from_a_stale_read_exposes_nobody_after_a_pause(rig: Rig) -> None:
    rollout_id = _start(rig, (Stage(1_000_000, 3600),))
    rig.engine.tick()
    with rig.store.transaction() as session:
        before = rollouts.exposed_device_ids(session, rollout_id)
        # A device registered late would join at the next tick...
        fleet.register_devices(
            session, [fleet.Registration("late", "ev6", "eu", "4.2", {})], rig.clock.now()
        )
        stale = rollouts.get_rollout(session, rollout_id)
    # ...but an operator pauses between the engine's read and its write.
    rig.commands.run("pause", rollout_id, actor="t", reason="")
    with rig.store.transaction() as session:
        assert rig.engine._step(session, stale) == 0
    with rig.store.transaction() as session:
        assert rollouts.exposed_device_ids(session, rollout_id) == before
        assert "late" not in before and len(before) == 20
        assert rollouts.get_rollout(session, rollout_id).state == states.PAUSED


def _report(rig: Rig, rollout_id: str, failing: int) -> None:
    """Every exposed device reports: the first `failing` FAILED, the rest ACTIVE."""
    with rig.store.transaction() as session:
        exposed = sorted(rollouts.exposed_device_ids(session, rollout_id))
        events = [
            IncomingEvent(
                d,
                int(rig.clock.now().timestamp()),
                rollout_id,
                "f",
                "1.0",
                "FAILED" if i < failing else "ACTIVE",
                "INSTALL_FAILED" if i < failing else "",
                "",
                "",
                None,
            )
            for i, d in enumerate(exposed)
        ]
        ingest_events(session, events, rig.clock.now())


def test_the_gate_pauses_and_a_resume_judges_fresh_evidence(rig: Rig) -> None:
    rollout_id = _start(rig, (Stage(500_000, 0), Stage(1_000_000, 0)))
    rig.engine.tick()
    _report(rig, rollout_id, failing=3)
    rig.clock.advance(timedelta(seconds=1))
    rig.engine.tick()
    with rig.store.transaction() as session:
        paused = rollouts.get_rollout(session, rollout_id)
    assert paused.state == states.PAUSED and "3 of" in paused.state_reason

    rig.clock.advance(timedelta(seconds=1))
    rig.commands.run("resume", rollout_id, actor="t", reason="fixed the install script")
    rig.engine.tick()  # the old failures predate the resume: no trip
    with rig.store.transaction() as session:
        resumed = rollouts.get_rollout(session, rollout_id)
    assert resumed.state == states.RUNNING and resumed.current_stage == 1
    rig.clock.advance(timedelta(seconds=1))
    rig.engine.tick()
    _report(rig, rollout_id, failing=0)
    rig.clock.advance(timedelta(seconds=1))
    rig.engine.tick()
    with rig.store.transaction() as session:
        assert rollouts.state_counts(session, rollout_id) == {"ACTIVE": 20}
        assert rollouts.get_rollout(session, rollout_id).state == states.COMPLETED
