"""What the engine and commands announce: gate breaches and trips, stages, outcomes, in the
outbox in the order they happened; and the gate counters of /metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta

from securesystemslib.signer import CryptoSigner
from sqlmodel import col, select

from ota.domain import states
from ota.metrics import Metrics
from ota.rollout.commands import RolloutCommands
from ota.rollout.engine import RolloutEngine
from ota.rollout.gates import HealthFigures
from ota.store import fleet, webhooks
from ota.store.models import WebhookEventRow
from ota.trust.director import Director
from tests.integration.test_engine_plans import Rig, rig  # noqa: F401

TTL = timedelta(days=1)


def _announced(rig: Rig, rollout_id: str) -> list[tuple[str, int]]:  # noqa: F811
    with rig.store.transaction() as session:
        rows = session.exec(select(WebhookEventRow).order_by(col(WebhookEventRow.id))).all()
    out = []
    for row in rows:
        body = json.loads(row.body)
        if body["data"].get("rollout_id") == rollout_id:
            out.append((body["type"], body["data"]["stage"]))
    return out


def test_gates_and_outcomes_are_announced_in_order_and_counted(rig: Rig) -> None:  # noqa: F811
    metrics = Metrics()
    director = Director(CryptoSigner.generate_ed25519())
    engine = RolloutEngine(
        rig.store,
        director,
        rig.clock,
        on_notify=lambda: None,
        desired_ttl=TTL,
        health=rig.health,
        metrics=metrics,
    )
    commands = RolloutCommands(
        rig.store, director, rig.clock, desired_ttl=TTL, on_change=lambda: None, metrics=metrics
    )
    rig = replace(rig, engine=engine, commands=commands)
    with rig.store.transaction() as session:
        webhooks.create(
            session,
            url="https://hooks.example.com/ota",
            event_types=(),
            feature="f",
            rollout_id="",
            description="",
            creator="admin",
            now=rig.clock.now(),
        )
    rollout_id = rig.start(
        "holdout: 10%\n"
        "stages: [{exposure: 20%}, {exposure: 100%}]\n"
        "gates:\n"
        "  - {metric: offline_ratio, max: 50%, action: hold}\n"
        "  - {metric: feature_error_rate, max: 1%, observe_only: true}\n"
        "  - {metric: crash_rate, max: 5%, versus_holdout: true, action: rollback}\n"
    )
    rig.tick()
    first = rig.exposed(rollout_id)
    rig.report(rollout_id)
    rig.tick()  # nobody online: held
    with rig.store.transaction() as session:
        fleet.mark_seen(session, [(d, rig.clock.now(), True) for d in first])
    rig.tick()
    rig.tick()
    rig.health.treated = HealthFigures(sampled=40, crashing=8, erroring=4)
    rig.health.control = HealthFigures(sampled=10, crashing=0, erroring=0)
    rig.tick()
    assert rig.get(rollout_id).state == states.ROLLED_BACK
    rig.commands.run("kill", rollout_id, actor="alice", reason="stop it everywhere")

    assert _announced(rig, rollout_id) == [
        ("rollout.created", 0),
        ("rollout.started", 0),
        ("rollout.stage_advanced", 1),
        ("rollout.gate_breached", 1),  # the offline gate holds stage 1
        ("rollout.stage_advanced", 2),
        ("rollout.gate_breached", 2),  # feature errors, observed only
        ("rollout.gate_tripped", 2),
        ("rollout.rolled_back", 2),
        ("rollout.killed", 2),
    ]
    sample = metrics.registry.get_sample_value
    assert sample("ota_gate_trips_total", {"metric": "crash_rate", "action": "rollback"}) == 1
    assert sample("ota_gate_trips_total", {"metric": "crash_rate", "action": "pause"}) == 0
    assert sample("ota_rollout_rollbacks_total", {"trigger": "gate"}) == 1
    assert sample("ota_rollout_rollbacks_total", {"trigger": "operator"}) == 0
    assert sample("ota_rollout_kills_total", {}) == 1
    breached = sample(
        "ota_gate_evaluations_total", {"metric": "offline_ratio", "result": "breached"}
    )
    assert breached is not None and breached >= 1
    ok = sample("ota_gate_evaluations_total", {"metric": "crash_rate", "result": "ok"})
    assert ok is not None and ok >= 3
