"""Periodic health samples name no rollout: ingest counts them for the rollout that
exposed the device, or for the rollout whose holdout the device is in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from ota.domain import states
from ota.domain.bucketing import is_control
from ota.domain.plan import RolloutPlan, Stage
from ota.store import adoption, fleet, rollouts
from ota.store.ingest import HealthFigures, IncomingEvent, ingest_events
from ota.store.models import AdoptionStatRow, BundleRow, RolloutRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 5, 1, tzinfo=UTC)
SALT = bytes(range(16))
HOLDOUT = 200_000


def _rollout(store: Store, n: int) -> tuple[list[str], list[str], list[str]]:
    """`n` devices (ev6 / ev9, the bundle is for ev6 only); a rollout with a 20 % holdout.

    Returns the exposed ev6 devices, the ev6 holdout, and the ev9 devices in the
    top slice (incompatible: not a control figure).
    """
    ids = [f"d{i:03d}" for i in range(n)]
    plan = RolloutPlan(stages=(Stage(ppm=500_000),), holdout_ppm=HOLDOUT)
    with store.transaction() as session:
        fleet.register_devices(
            session,
            [
                fleet.Registration(d, ("ev6", "ev9")[i % 2], "eu", "4.2", {})
                for i, d in enumerate(ids)
            ],
            NOW,
        )
        session.add(
            BundleRow(
                name="bundles/f/2.0",
                feature="f",
                version="2.0",
                target_path="f/2.0",
                sha256="00" * 32,
                length=1,
                models_json='["ev6"]',
                created_at=NOW,
            )
        )
        session.add(
            RolloutRow(
                rollout_id="r-1",
                feature="f",
                version="2.0",
                bundle_name="bundles/f/2.0",
                stages_json=plan.stages_json(),
                gate_json=plan.gate_json(),
                state=states.RUNNING,
                salt_hex=SALT.hex(),
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.flush()
        ev6 = [d for i, d in enumerate(ids) if i % 2 == 0]
        control = [d for d in ev6 if is_control(SALT, d, HOLDOUT)]
        exposed = [d for d in ev6 if d not in control][:10]
        rollouts.expose(session, "r-1", [fleet.get_device(session, d) for d in exposed], 0, NOW)
    incompatible = [d for i, d in enumerate(ids) if i % 2 and is_control(SALT, d, HOLDOUT)]
    return exposed, control, incompatible


def _sample(device: str, seq: int, feature: str, version: str, crashes: int) -> IncomingEvent:
    return IncomingEvent(
        device,
        seq,
        "",
        feature,
        version,
        "ACTIVE",
        "",
        "",
        "",
        NOW,
        HealthFigures(crashes, crashes, 60),
    )


def test_samples_count_for_the_exposed_devices_and_for_the_holdout(store: Store) -> None:
    exposed, control, incompatible = _rollout(store, 80)
    assert control and incompatible
    events = [
        *(_sample(d, 1, "f", "2.0", 1) for d in exposed),  # the treatment crashes
        *(_sample(d, 2, "f", "1.0", 0) for d in exposed),  # (after a revert: not treatment)
        *(_sample(d, 1, "f", "1.0", 0) for d in control),  # the baseline does not
        *(_sample(d, 2, "", "", 1) for d in control[:1]),  # no feature: control of any rollout
        *(_sample(d, 3, "g", "9.9", 1) for d in control),  # another feature: not counted
        *(_sample(d, 1, "f", "1.0", 1) for d in incompatible),  # not a control device
    ]
    with store.transaction() as session:
        ingest_events(session, events, NOW)
        # A re-sent sample is a duplicate, counted once.
        ingest_events(session, events[:3], NOW)
    with store.transaction() as session:
        treated = adoption.health_since(session, "r-1", control=False, since=NOW)
        held = adoption.health_since(session, "r-1", control=True, since=NOW)
        later = adoption.health_since(
            session, "r-1", control=True, since=NOW + timedelta(minutes=2)
        )
    assert treated == {
        "samples": len(exposed),
        "crashes": len(exposed),
        "feature_errors": len(exposed),
        "unhealthy_samples": len(exposed),
    }
    assert held == {
        "samples": len(control) + 1,
        "crashes": 1,
        "feature_errors": 1,
        "unhealthy_samples": 1,
    }
    assert later == {}


def test_finished_rollouts_get_no_more_samples(store: Store) -> None:
    _, control, _ = _rollout(store, 40)
    with store.transaction() as session:
        rollout = session.get(RolloutRow, "r-1")
        assert rollout is not None
        rollout.state = states.ROLLED_BACK
        session.add(rollout)
    with store.transaction() as session:
        ingest_events(session, [_sample(d, 1, "f", "1.0", 0) for d in control], NOW)
    with store.transaction() as session:
        assert adoption.health_since(session, "r-1", control=True) == {}


def _used(store: Store, metric: str) -> int:
    with store.transaction() as session:
        return sum(
            r.value
            for r in session.exec(
                select(AdoptionStatRow).where(
                    AdoptionStatRow.rollout_id == "r-1", AdoptionStatRow.metric == metric
                )
            )
        )


def test_a_device_counts_once_as_using_the_feature_and_the_holdout_apart(store: Store) -> None:
    exposed, control, _ = _rollout(store, 80)
    users, holdout_users = exposed[:4], control[:2]

    def sample(device: str, seq: int, version: str, uses: int) -> IncomingEvent:
        return IncomingEvent(
            device, seq, "", "f", version, "ACTIVE", "", "", "", NOW, HealthFigures(0, 0, 60, uses)
        )

    first = [
        *(sample(d, 1, "2.0", 3) for d in users),
        *(sample(d, 1, "2.0", 0) for d in exposed[4:]),
        *(sample(d, 1, "1.0", 2) for d in holdout_users),  # the holdout uses its old version
    ]
    later = [*(sample(d, 2, "2.0", 1) for d in users), *(sample(d, 2, "1.0", 5) for d in control)]
    with store.transaction() as session:
        ingest_events(session, first, NOW)
    with store.transaction() as session:
        ingest_events(session, later, NOW + timedelta(seconds=30))
        ingest_events(session, first[:2], NOW + timedelta(seconds=30))  # re-sent: duplicates
    assert _used(store, adoption.USED) == len(users)
    assert _used(store, adoption.HOLDOUT_USED) == len(control)
    with store.transaction() as session:
        treated = adoption.health_since(session, "r-1", control=False)
        held = adoption.health_since(session, "r-1", control=True)
    assert (treated["samples_used"], treated["uses"]) == (2 * len(users), 4 * len(users))
    assert held["samples_used"] == len(holdout_users) + len(control)
    assert held["uses"] == 2 * len(holdout_users) + 5 * len(control)
