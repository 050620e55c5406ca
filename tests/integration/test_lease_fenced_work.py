"""The lease holder's publishing and timestamp re-signing are fenced, as the engine's writes.

Two replicas' leases on one database: a replica that lost the lease while
it still believed it held it records nothing, and the new holder does that
work. Desired states go out to a real private broker.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from sqlmodel import select

from ota.clock import ManualClock
from ota.keyring import generate_keyring
from ota.rollout.lease import FencedStore, Lease, LeaseLost
from ota.rollout.notify import issue_desired_states
from ota.signing.keys import load_signer
from ota.store import desired, fleet
from ota.store.bundles import SqlMetadataStore
from ota.store.models import TufMetadataRow
from ota.store.session import Store
from ota.transport.mqtt import MqttLink
from ota.transport.publisher import DesiredStatePublisher
from ota.transport.topics import Topics
from ota.trust.director import Director
from ota.trust.freshness import TimestampRefresher
from ota.trust.repository import ImageRepository
from tests.broker_harness import BrokerHandle

pytestmark = pytest.mark.integration
DURATION = 10.0
TTL = timedelta(hours=2)


class Ticker:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replicas:
    """Replica A holds the lease; `take_over` lets B take it while A still believes it holds."""

    def __init__(self, store: Store) -> None:
        self.clock, self.ticker = ManualClock(), Ticker()
        self.lost: list[str] = []
        self.a = self._lease(store, "cp-a")
        self.b = self._lease(store, "cp-b")
        self.a.tick()
        self.b.tick()
        assert self.a.held() and not self.b.held()

    def _lease(self, store: Store, holder: str) -> Lease:
        return Lease(
            store,
            self.clock,
            holder=holder,
            duration_seconds=DURATION,
            renew_seconds=3,
            monotonic=self.ticker,
            on_lost=lambda: self.lost.append(holder),
        )

    def take_over(self) -> None:
        # B's clock runs ahead of A's: B sees the row expired while A's own term runs.
        self.clock.advance(timedelta(seconds=DURATION + 1))
        self.b.tick()
        assert self.b.held() and self.a.held()


@pytest.fixture
def link(broker: BrokerHandle) -> Iterator[MqttLink]:
    """The control plane's link to a real private broker, not ingesting."""
    link = MqttLink(
        broker.url,
        username=broker.control_username,
        password=broker.control_password,
        topics=Topics(broker.topic_root),
        ingest=False,
    )
    link.start()
    yield link
    link.stop()


def _unpublished(store: Store) -> set[str]:
    with store.transaction() as session:
        return {row.device_id for row in desired.unpublished(session, 100)}


def test_a_publisher_that_lost_the_lease_marks_nothing_published(
    store: Store, link: MqttLink
) -> None:
    replicas = Replicas(store)
    clock = replicas.clock
    with store.transaction() as session:
        fleet.register_devices(
            session,
            [fleet.Registration(f"d{i}", "ev6", "eu", "4.2", {}) for i in range(3)],
            clock.now(),
        )
        director = Director(CryptoSigner.generate_ed25519())
        issue_desired_states(session, ["d0", "d1", "d2"], director, now=clock.now(), ttl=TTL)
    publisher_a = DesiredStatePublisher(
        link, store, holds_lease=replicas.a.held, fenced=FencedStore(store.engine, replicas.a)
    )
    # B takes over while A, paused say, still believes it holds the lease: A's
    # pass publishes, but recording it fails before writing anything.
    replicas.take_over()
    with pytest.raises(LeaseLost):
        publisher_a._drain_once()
    assert publisher_a.published == 0
    assert _unpublished(store) == {"d0", "d1", "d2"}

    # A notices; the new holder publishes the same rows and records them.
    replicas.a.tick()
    assert not replicas.a.held() and replicas.lost == ["cp-a"]
    publisher_b = DesiredStatePublisher(
        link, store, holds_lease=replicas.b.held, fenced=FencedStore(store.engine, replicas.b)
    )
    assert publisher_b._drain_once() is True
    assert publisher_b.published == 3 and _unpublished(store) == set()


def _timestamp_versions(store: Store) -> list[int]:
    with store.transaction() as session:
        rows = session.exec(select(TufMetadataRow).where(TufMetadataRow.role == "timestamp"))
        return sorted(r.version for r in rows)


def test_a_refresher_that_lost_the_lease_stores_no_timestamp(store: Store, tmp_path: Path) -> None:
    replicas = Replicas(store)
    keys = generate_keyring(tmp_path / "keys", clock=replicas.clock)

    def repository() -> ImageRepository:
        repo = ImageRepository(
            SqlMetadataStore(store),
            snapshot_signer=load_signer(keys.snapshot_key),
            timestamp_signer=load_signer(keys.timestamp_key),
            clock=replicas.clock,
        )
        repo.bootstrap(keys.root_json.read_bytes(), keys.targets_json.read_bytes())
        return repo

    def refresher(lease: Lease) -> TimestampRefresher:
        return TimestampRefresher(
            repository(),
            min_remaining=timedelta(days=400),  # always due: every refresh re-signs
            holds_lease=lease.held,
            fenced=SqlMetadataStore(FencedStore(store.engine, lease)),
        )

    on_a, on_b = refresher(replicas.a), refresher(replicas.b)
    before = _timestamp_versions(store)
    on_a.refresh()  # A holds: it re-signs
    assert len(_timestamp_versions(store)) == len(before) + 1
    replicas.take_over()
    with pytest.raises(LeaseLost):
        on_a.refresh()
    assert len(_timestamp_versions(store)) == len(before) + 1
    on_b.refresh()
    assert len(_timestamp_versions(store)) == len(before) + 2
