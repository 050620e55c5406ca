"""The rollout engine on a real SQLite file with a clock the test moves."""

from __future__ import annotations

from datetime import timedelta

import pytest
from securesystemslib.signer import CryptoSigner

from ota.clock import ManualClock
from ota.rollout.engine import RolloutEngine
from ota.rollout.notify import issue_desired_states
from ota.store import fleet
from ota.store.database import migrate, open_database
from ota.store.models import DesiredStateRow
from ota.store.session import Store
from ota.trust.director import Director
from ota.v1 import common_pb2

pytestmark = pytest.mark.integration
TTL = timedelta(hours=2)


def test_desired_states_are_renewed_halfway_through_their_life(database_url: str) -> None:
    engine_db = open_database(database_url)
    migrate(engine_db)
    store = Store(engine_db)
    clock = ManualClock()
    director = Director(CryptoSigner.generate_ed25519())
    with store.transaction() as session:
        fleet.register_devices(
            session, [fleet.Registration("d1", "ev6", "eu", "4.2", {})], clock.now()
        )
        issue_desired_states(session, ["d1"], director, now=clock.now(), ttl=TTL)
    notified: list[int] = []
    engine = RolloutEngine(
        store, director, clock, on_notify=lambda: notified.append(1), desired_ttl=TTL
    )

    def current() -> common_pb2.DesiredState:
        with store.transaction() as session:
            row = session.get(DesiredStateRow, "d1")
            assert row is not None
            envelope = common_pb2.Envelope.FromString(row.envelope)
        return common_pb2.DesiredState.FromString(envelope.payload)

    engine.tick()
    assert current().generation == 1 and notified == []
    clock.advance(TTL / 2 + timedelta(seconds=1))
    engine.tick()
    renewed = current()
    assert renewed.generation == 2 and notified == [1]
    assert renewed.expires_at.ToDatetime().replace(tzinfo=clock.now().tzinfo) == clock.now() + TTL
    engine_db.dispose()
