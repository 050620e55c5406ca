"""Plans on the engine, against a real SQLite file and a clock the test moves.

Approval stages, maintenance windows, holdouts, deadlines, gates with their
actions and streaks, the kill switch, salt reuse, edits and the dry run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session, select

from ota.clock import ManualClock
from ota.domain import states
from ota.domain.bucketing import is_control
from ota.domain.plan_document import parse_plan_document
from ota.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from ota.rollout.commands import Actor, NewRollout, RolloutCommands
from ota.rollout.engine import RolloutEngine
from ota.rollout.gates import HealthFigures
from ota.rollout.preview import preview_rollout
from ota.store import bundles, desired, fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.ingest import IncomingEvent, ingest_events
from ota.store.models import DeviceFeatureRow, RolloutRow
from ota.store.session import Store
from ota.trust.director import Director

pytestmark = pytest.mark.integration
TTL = timedelta(days=1)
MONDAY_NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


class FakeHealth:
    """Health figures the test sets, for the exposed devices and the holdout."""

    def __init__(self) -> None:
        self.treated = HealthFigures()
        self.control = HealthFigures()

    def health(
        self, session: Session, rollout: RolloutRow, *, since: datetime, control: bool
    ) -> HealthFigures:
        return self.control if control else self.treated


@dataclass
class Rig:
    store: Store
    clock: ManualClock
    engine: RolloutEngine
    commands: RolloutCommands
    health: FakeHealth

    def create(self, body: str, *, actor: str = "alice") -> str:
        doc = parse_plan_document("feature: f\nversion: '1.0'\n" + body)
        new = NewRollout(doc.feature, doc.version, doc.selector, doc.plan, "")
        return self.commands.create(new, actor=actor).rollout_id

    def start(self, body: str) -> str:
        rollout_id = self.create(body)
        self.commands.run("start", rollout_id, actor="alice", reason="")
        return rollout_id

    def get(self, rollout_id: str) -> RolloutRow:
        with self.store.transaction() as session:
            return rollouts.get_rollout(session, rollout_id)

    def exposed(self, rollout_id: str) -> set[str]:
        with self.store.transaction() as session:
            return rollouts.exposed_device_ids(session, rollout_id)

    def report(self, rollout_id: str, state: str = "ACTIVE", *, failing: int = 0) -> None:
        """Every exposed device not yet reported says `state` (the first `failing` FAILED)."""
        self.clock.advance(timedelta(seconds=1))
        with self.store.transaction() as session:
            done = {
                d
                for d, s in _states(session, rollout_id).items()
                if s not in ("TARGETED", "NOTIFIED")
            }
            todo = sorted(rollouts.exposed_device_ids(session, rollout_id) - done)
            events = [
                IncomingEvent(
                    d,
                    int(self.clock.now().timestamp() * 1000) + i,
                    rollout_id,
                    "f",
                    "1.0",
                    "FAILED" if i < failing else state,
                    "INSTALL_FAILED" if i < failing else "",
                    "",
                    "",
                    None,
                )
                for i, d in enumerate(todo)
            ]
            ingest_events(session, events, self.clock.now())

    def actions(self, rollout_id: str) -> list[str]:
        with self.store.transaction() as session:
            return [a.action for a in rollouts.audit_log(session, rollout_id)]

    def tick(self, seconds: float = 1) -> None:
        self.clock.advance(timedelta(seconds=seconds))
        self.engine.tick()


def _states(session: Session, rollout_id: str) -> dict[str, str]:
    from ota.store.models import RolloutDeviceRow

    rows = session.exec(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout_id))
    return {r.device_id: r.state for r in rows}


@pytest.fixture
def rig(database_url: str) -> Iterator[Rig]:
    db = open_database(database_url)
    migrate(db)
    store = Store(db)
    clock = ManualClock(MONDAY_NOON)
    director = Director(CryptoSigner.generate_ed25519())
    health = FakeHealth()
    with store.transaction() as session:
        bundles.add_bundle(
            session,
            feature="f",
            version="1.0",
            target_path="features/f/1.0.bundle",
            sha256="00" * 32,
            length=10,
            models=["ev6", "ev9"],
            min_firmware="4.0",
            signer_keyids=[],
            request_id=None,
            now=clock.now(),
        )
        registrations = [
            fleet.Registration(
                f"d{i:03d}",
                "ev6" if i % 2 else "ev9",
                "eu" if i % 3 else "us",
                "4.2",
                {"fleet": "internal"} if i < 3 else {},
            )
            for i in range(200)
        ]
        registrations += [
            fleet.Registration("old-fw", "ev6", "eu", "3.9", {}),
            fleet.Registration("niro-1", "niro", "eu", "4.2", {}),
            fleet.Registration("revoked-1", "ev6", "eu", "4.2", {}),
        ]
        fleet.register_devices(session, registrations, clock.now())
        fleet.revoke(session, "revoked-1")
    yield Rig(
        store,
        clock,
        RolloutEngine(
            store, director, clock, on_notify=lambda: None, desired_ttl=TTL, health=health
        ),
        RolloutCommands(store, director, clock, desired_ttl=TTL, on_change=lambda: None),
        health,
    )
    db.dispose()


def test_an_approval_stage_waits_for_an_approver(rig: Rig) -> None:
    rollout_id = rig.start(
        "approvers: [bob]\n"
        "cohort: {name: internal, label: fleet=internal, advance: approval}\n"
        "stages: [{exposure: 100%}]\n"
    )
    rig.tick()
    assert rig.exposed(rollout_id) == {"d000", "d001", "d002"}
    rig.report(rollout_id)
    for _ in range(3):
        rig.tick(600)
    row = rig.get(rollout_id)
    assert (row.current_stage, row.phase) == (0, "awaiting_approval")
    assert rig.exposed(rollout_id) == {"d000", "d001", "d002"}
    # A writer who is not an approver is refused, naming who may approve.
    with pytest.raises(PermissionDenied, match="bob"):
        rig.commands.run("promote", rollout_id, actor=Actor("carol", "release"), reason="")
    rig.commands.run("promote", rollout_id, actor=Actor("bob", "release"), reason="looks good")
    rig.tick()
    rig.tick()
    assert len(rig.exposed(rollout_id)) == 200
    assert rig.actions(rollout_id).count("awaiting_approval") == 1
    with rig.store.transaction() as session:
        promote = next(a for a in rollouts.audit_log(session, rollout_id) if a.action == "promote")
    assert (promote.actor, promote.reason, promote.diff) == (
        "bob",
        "looks good",
        {"promoted": [False, True]},
    )


def test_a_maintenance_window_defers_exposure_until_it_opens(rig: Rig) -> None:
    rollout_id = rig.start(
        "maintenance_windows: [{days: [mon], start: '13:00', end: '14:00'}]\n"
        "stages: [{exposure: 100%}]\n"
    )
    rig.tick()  # Monday 12:00: closed
    assert rig.exposed(rollout_id) == set()
    assert rig.get(rollout_id).phase == "deferred"
    rig.tick(3600)  # 13:00: open
    assert len(rig.exposed(rollout_id)) == 200
    # A device registered after the window closed waits for the next one.
    rig.clock.set(MONDAY_NOON + timedelta(hours=2, minutes=30))
    with rig.store.transaction() as session:
        fleet.register_devices(
            session, [fleet.Registration("late", "ev6", "eu", "4.2", {})], rig.clock.now()
        )
    rig.tick()
    assert "late" not in rig.exposed(rollout_id)
    rig.clock.set(MONDAY_NOON + timedelta(days=7, hours=1, minutes=5))
    rig.tick()
    assert "late" in rig.exposed(rollout_id)
    actions = rig.actions(rollout_id)
    assert actions.count("deferred") == 2 and actions.count("end-deferred") == 2


def test_holdout_devices_are_never_exposed_and_the_dry_run_says_why(rig: Rig) -> None:
    rollout_id = rig.create("holdout: 20%\nstages: [{exposure: 50%}, {exposure: 100%}]\n")
    with rig.store.transaction() as session:
        preview = preview_rollout(session, rollout_id)
        salt = bytes.fromhex(rollouts.get_rollout(session, rollout_id).salt_hex)
    control = {f"d{i:03d}" for i in range(200) if is_control(salt, f"d{i:03d}", 200_000)}
    assert 20 < len(control) < 60
    assert preview.fleet == 203
    assert preview.excluded == {"not_eligible": 1, "incompatible": 2, "holdout": len(control)}
    assert preview.candidates == 200 - len(control)
    assert preview.stages[-1].exposed == 200 - len(control)
    models = {(b.dimension, b.value): b.devices for b in preview.stages[-1].cohorts}
    assert models[("model", "ev6")] + models[("model", "ev9")] == 200 - len(control)

    rig.commands.run("start", rollout_id, actor="alice", reason="")
    rig.tick()
    assert len(rig.exposed(rollout_id)) == preview.stages[0].exposed
    rig.report(rollout_id)
    rig.tick()
    rig.tick()
    rig.report(rollout_id)
    rig.tick()
    exposed = rig.exposed(rollout_id)
    assert exposed.isdisjoint(control)
    assert len(exposed) == 200 - len(control)
    assert rig.get(rollout_id).state == states.COMPLETED


def test_the_kill_switch_deactivates_every_exposed_device_at_once(rig: Rig) -> None:
    rollout_id = rig.start("stages: [{exposure: 30%, min_soak: 1h}, {exposure: 100%}]\n")
    rig.tick()
    exposed = rig.exposed(rollout_id)
    assert exposed
    with rig.store.transaction() as session:
        before = {d: r.generation for d, r in _devices(session, exposed).items()}
    killed = rig.commands.run("kill", rollout_id, actor="alice", reason="crashes in the field")
    assert killed.state == states.KILLED
    with rig.store.transaction() as session:
        rows = desired.features_of(session, sorted(exposed), "f")
        after = _devices(session, exposed)
    assert {r.active for r in rows.values()} == {False}
    assert all(after[d].generation == before[d] + 1 for d in exposed)
    rig.tick(7200)  # the engine never touches a killed rollout again
    assert rig.exposed(rollout_id) == exposed
    with pytest.raises(FailedPrecondition):
        rig.commands.run("resume", rollout_id, actor="alice", reason="")


def _devices(session: Session, ids: set[str]) -> dict[str, DeviceFeatureRow]:
    from ota.store.models import DeviceRow

    rows = session.exec(select(DeviceRow))
    return {r.device_id: r for r in rows if r.device_id in ids}  # type: ignore[misc]


def test_a_stage_that_misses_its_deadline_pauses(rig: Rig) -> None:
    rollout_id = rig.start("stages: [{exposure: 10%, deadline: 10m}, {exposure: 100%}]\n")
    rig.tick()
    rig.tick(300)
    assert rig.get(rollout_id).state == states.RUNNING  # nobody finished yet, but in time
    rig.tick(301)
    row = rig.get(rollout_id)
    assert row.state == states.PAUSED
    assert "missed its deadline" in row.state_reason and "more finished devices" in row.state_reason


def test_gates_hold_observe_and_trip_after_their_streak(rig: Rig) -> None:
    rollout_id = rig.start(
        "holdout: 10%\n"
        "stages: [{exposure: 20%}, {exposure: 100%}]\n"
        "gates:\n"
        "  - {metric: install_failure, max: 50%, min_sample: 5}\n"
        "  - {metric: offline_ratio, max: 50%, action: hold}\n"
        "  - {metric: feature_error_rate, max: 1%, observe_only: true}\n"
        "  - {metric: crash_rate, max: 5%, versus_holdout: true, breaches_to_trip: 2,"
        " action: rollback}\n"
    )
    rig.tick()
    first = rig.exposed(rollout_id)
    rig.report(rollout_id)
    # Every device is offline (none ever connected): the offline gate holds the stage.
    rig.tick()
    row = rig.get(rollout_id)
    assert (row.state, row.current_stage, row.phase) == (states.RUNNING, 0, "held")
    with rig.store.transaction() as session:
        for d in first:
            fleet.mark_seen(session, [(d, rig.clock.now(), True)])
    rig.tick()
    rig.tick()
    assert rig.get(rollout_id).current_stage == 1
    # Feature errors are only observed; crashes versus the holdout trip on the second breach.
    rig.health.treated = HealthFigures(sampled=40, crashing=8, erroring=4)
    rig.health.control = HealthFigures(sampled=10, crashing=0, erroring=0)
    rig.tick()
    rig.tick()  # the same evidence again: still one breach
    assert rig.get(rollout_id).state == states.RUNNING
    rig.health.treated = HealthFigures(sampled=41, crashing=9, erroring=4)
    rig.tick()
    row = rig.get(rollout_id)
    assert row.state == states.ROLLED_BACK
    assert "9 of 41 health samples reported a crash" in row.state_reason
    assert "0 of 10 in the holdout" in row.state_reason
    with rig.store.transaction() as session:
        log = rollouts.audit_log(session, rollout_id)
    actions = [a.action for a in log]
    # Held at stage 1 (nobody online), and again at stage 2 by its new, offline devices.
    assert actions == [
        "create",
        "start",
        "advance",
        "expose",
        "held",
        "advance",
        "expose",
        "gate-observed",
        "held",
        "rollback",
    ]
    # Once the devices came online the hold ended and the stage advanced at once.
    advance = log[actions.index("held") + 1]
    assert advance.action == "advance" and advance.diff is not None
    assert advance.diff["phase"] == ["held", "exposing"]
    rollback = log[-1]
    assert rollback.actor == "engine" and rollback.diff is not None
    assert rollback.diff["figures"]["bad"] == 9 and rollback.diff["figures"]["breaches"] == 2


def test_a_salt_is_reused_within_a_feature_only(rig: Rig) -> None:
    first = rig.create("stages: [{exposure: 10%}]\n")
    second = rig.create(f"salt_from: {first}\nstages: [{{exposure: 10%}}]\n")
    assert rig.get(second).salt_hex == rig.get(first).salt_hex
    with pytest.raises(InvalidArgument) as e:
        rig.create("salt_from: r-nothere\nstages: [{exposure: 10%}]\n")
    assert e.value.field == "salt_from"


def test_edits_are_versioned_and_audited(rig: Rig) -> None:
    rollout_id = rig.start("stages: [{exposure: 10%, min_soak: 1h}, {exposure: 50%}]\n")
    rig.tick()
    edited = parse_plan_document(
        "feature: f\nversion: '1.0'\nstages: [{exposure: 10%, min_soak: 1h}, {exposure: 100%}]\n"
    ).plan
    row = rig.commands.edit(rollout_id, edited, actor="alice", reason="go all the way")
    assert row.plan_version == 2
    with pytest.raises(InvalidArgument) as e:
        past = parse_plan_document(
            "feature: f\nversion: '1.0'\nstages: [{exposure: 5%}, {exposure: 100%}]\n"
        ).plan
        rig.commands.edit(rollout_id, past, actor="alice", reason="")
    assert e.value.field == "stages[0]"
    with rig.store.transaction() as session:
        entry = rollouts.audit_log(session, rollout_id)[-1]
    assert entry.action == "edit" and entry.diff is not None
    assert entry.diff["plan_version"] == [1, 2]
    assert [s["ppm"] for s in entry.diff["stages"][1]] == [100_000, 1_000_000]


def test_a_tick_says_when_the_next_soak_end_or_deadline_falls_due(rig: Rig) -> None:
    rig.start("stages: [{exposure: 10%, min_soak: 30m, deadline: 1h}, {exposure: 100%}]\n")
    rig.clock.advance(timedelta(seconds=1))
    # Entering the stage exposes its devices; nothing of it is due before the soak ends.
    assert rig.engine.tick() == pytest.approx(1800)
    rig.clock.advance(timedelta(minutes=20))
    assert rig.engine.tick() == pytest.approx(600)
    rig.clock.advance(timedelta(minutes=11))
    # Soaked but nobody finished: the deadline is next.
    assert rig.engine.tick() == pytest.approx(1740)


def test_a_tick_that_advances_a_stage_asks_to_run_again_at_once(rig: Rig) -> None:
    rollout_id = rig.start("stages: [{exposure: 10%}, {exposure: 100%}]\n")
    rig.clock.advance(timedelta(seconds=1))
    rig.engine.tick()
    rig.report(rollout_id)
    assert rig.engine.tick() == 0.0  # entered stage 2: its exposure comes next, not a tick later
    assert rig.get(rollout_id).current_stage == 1
    # Nothing is due by time now: only a signal (or the safety interval) runs it.
    assert rig.engine.tick() is None
