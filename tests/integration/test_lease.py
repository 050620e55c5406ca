"""The engine lease on each database: one holder, takeover after expiry, fencing, hand-over."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select

from ota.clock import ManualClock
from ota.config import load_server_config
from ota.errors import InvalidArgument
from ota.rollout.lease import FencedStore, Lease, LeaseLost
from ota.store import lease as lease_rows
from ota.store.database import open_database
from ota.store.models import IngestDropRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
DURATION = 10.0


class Ticker:
    """A monotonic clock the test moves, shared by the replicas' leases."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lease(store: Store, clock: ManualClock, ticker: Ticker, holder: str) -> Lease:
    return Lease(
        store, clock, holder=holder, duration_seconds=DURATION, renew_seconds=3, monotonic=ticker
    )


def _advance(clock: ManualClock, ticker: Ticker, seconds: float) -> None:
    clock.advance(timedelta(seconds=seconds))
    ticker.now += seconds


def _row(store: Store) -> tuple[str, int]:
    with store.transaction() as session:
        row = lease_rows.current(session, "engine")
        assert row is not None
        return row.holder, row.token


def test_one_holder_until_it_stops_renewing_then_the_other_takes_over_fenced(
    store: Store,
) -> None:
    clock, ticker = ManualClock(), Ticker()
    a, b = _lease(store, clock, ticker, "cp-a"), _lease(store, clock, ticker, "cp-b")
    a.tick()
    b.tick()
    assert a.held() and not b.held()
    assert _row(store) == ("cp-a", 1)

    # Renewals keep it with A, well past one lease duration.
    for _ in range(5):
        _advance(clock, ticker, 4)
        a.tick()
        b.tick()
    assert a.held() and not b.held() and a.token == 1

    # A stalls: past the duration it no longer believes it holds the lease, and B takes it.
    _advance(clock, ticker, DURATION + 1)
    assert not a.held()
    b.tick()
    assert b.held() and b.token == 2
    assert _row(store) == ("cp-b", 2)

    # A wakes up: its renewal fails, and its fenced writes fail before writing anything.
    a.tick()
    assert not a.held()
    fenced = FencedStore(store.engine, a)
    with pytest.raises(LeaseLost), fenced.transaction() as session:
        session.add(IngestDropRow(reason="written-by-a-stale-holder", count=1))
    with FencedStore(store.engine, b).transaction() as session:
        session.add(IngestDropRow(reason="written-by-the-holder", count=1))
    with store.transaction() as session:
        assert [r.reason for r in session.exec(select(IngestDropRow))] == ["written-by-the-holder"]


def test_a_stale_token_is_fenced_even_while_the_holder_believes_it_holds(store: Store) -> None:
    clock, ticker = ManualClock(), Ticker()
    a = _lease(store, clock, ticker, "cp-a")
    a.tick()
    # Another replica took the lease (a clock ahead of A's, say) while A's term runs.
    with store.transaction() as session:
        assert lease_rows.acquire(
            session,
            "engine",
            "cp-b",
            now=clock.now() + timedelta(seconds=DURATION + 1),
            duration=timedelta(seconds=DURATION),
            reclaim=False,
        )
    assert a.held()
    with pytest.raises(LeaseLost), FencedStore(store.engine, a).transaction():
        pass
    a.tick()
    assert not a.held()


def test_a_restarted_replica_takes_its_own_lease_back_at_once_with_a_new_token(
    store: Store,
) -> None:
    clock, ticker = ManualClock(), Ticker()
    first = _lease(store, clock, ticker, "cp-a")
    first.tick()
    other = _lease(store, clock, ticker, "cp-b")
    other.tick()
    assert not other.held()
    # The process dies without releasing; its successor runs under the same id.
    again = _lease(store, clock, ticker, "cp-a")
    again.tick()
    assert again.held() and again.token == 2
    with pytest.raises(LeaseLost), FencedStore(store.engine, first).transaction():
        pass


def test_a_clean_stop_hands_the_lease_over_without_waiting_for_expiry(store: Store) -> None:
    clock, ticker = ManualClock(), Ticker()
    a, b = _lease(store, clock, ticker, "cp-a"), _lease(store, clock, ticker, "cp-b")
    a.tick()
    b.tick()
    assert not b.held()
    a.stop()
    assert not a.held()
    b.tick()
    assert b.held() and _row(store) == ("cp-b", 2)


def test_a_holder_that_cannot_renew_stops_at_expiry_and_resumes_if_nobody_took_over(
    store: Store,
) -> None:
    clock, ticker = ManualClock(), Ticker()
    a = _lease(store, clock, ticker, "cp-a")
    a.tick()
    _advance(clock, ticker, DURATION + 1)
    assert not a.held()  # no renewal within its term: the work stops
    a.tick()  # the database answers again and nobody took over
    assert a.held() and a.token == 1


@pytest.mark.parametrize(
    ("duration", "renew", "field"),
    [
        (0, 1, "lease_duration_seconds"),
        (5, 5, "lease_renew_seconds"),
        (5, 0, "lease_renew_seconds"),
    ],
)
def test_lease_timing_is_validated_naming_the_setting(
    duration: float, renew: float, field: str
) -> None:
    store = Store(open_database("sqlite://"))
    with pytest.raises(InvalidArgument) as error:
        Lease(store, ManualClock(), holder="cp", duration_seconds=duration, renew_seconds=renew)
    assert error.value.field == field


def test_replica_and_lease_settings_come_from_the_environment() -> None:
    config = load_server_config(
        None,
        env={
            "OTA_REPLICA_ID": "cp-2",
            "OTA_LEASE_DURATION_SECONDS": "4.5",
            "OTA_LEASE_RENEW_SECONDS": "1",
            "OTA_PUBLISH_POLL_SECONDS": "0.5",
        },
    )
    assert (config.replica_id, config.lease_duration_seconds) == ("cp-2", 4.5)
    assert (config.lease_renew_seconds, config.publish_poll_seconds) == (1.0, 0.5)
    assert load_server_config(None, env={}).replica_id == ""  # then the MQTT username
