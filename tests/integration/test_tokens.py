"""API token storage on SQLite and PostgreSQL: digests only, revocation, last use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlmodel import select

from ota.api import auth as auth_module
from ota.api.auth import Authenticator
from ota.clock import ManualClock, utc
from ota.errors import NotFound, Unauthenticated
from ota.store import fleet, tokens
from ota.store.models import ApiTokenRow
from ota.store.session import Store

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_only_the_digest_is_stored_and_revocation_holds_at_the_next_call(store: Store) -> None:
    clock = ManualClock(NOW)
    auth = Authenticator(store, {"bootstrap-admin": "admin:root"}, clock)
    with store.transaction() as session:
        issued = tokens.create(session, display_name="ci", role="release", creator="root", now=NOW)
    with store.transaction() as session:
        rows = session.exec(select(ApiTokenRow)).all()
    assert len(rows) == 1
    assert issued.secret not in {v for r in rows for v in r.model_dump().values() if v}
    assert rows[0].token_sha256 == tokens.digest(issued.secret)

    caller = auth.authenticate(issued.secret)
    assert (caller.role, caller.name) == ("release", "ci")

    def last_used() -> datetime | None:
        with store.transaction() as session:
            row = session.get(ApiTokenRow, issued.row.token_id)
            assert row is not None
            return utc(row.last_used_at) if row.last_used_at else None

    assert last_used() == NOW
    clock.advance(timedelta(seconds=30))
    auth.authenticate(issued.secret)
    assert last_used() == NOW  # written at most once a minute
    clock.advance(timedelta(seconds=31))
    auth.authenticate(issued.secret)
    assert last_used() == NOW + timedelta(seconds=61)

    with store.transaction() as session:
        revoked = tokens.revoke(session, issued.row.token_id, clock.now())
    assert revoked.revoked_at is not None
    with pytest.raises(Unauthenticated):
        auth.authenticate(issued.secret)
    with store.transaction() as session:  # revoking again changes nothing
        again = tokens.revoke(session, issued.row.token_id, clock.now() + timedelta(hours=1))
    assert again.revoked_at is not None and revoked.revoked_at is not None
    assert utc(again.revoked_at) == utc(revoked.revoked_at)
    with pytest.raises(NotFound), store.transaction() as session:
        tokens.revoke(session, "0000000000000000", clock.now())
    # The config token still works: the bootstrap admin.
    assert auth.authenticate("bootstrap-admin").role == "admin"


def test_listing_pages_and_filters_revoked_tokens(store: Store) -> None:
    with store.transaction() as session:
        made = [
            tokens.create(session, display_name=f"t{i}", role="viewer", creator="root", now=NOW)
            for i in range(5)
        ]
        tokens.revoke(session, made[0].row.token_id, NOW)
    with store.transaction() as session:
        everything = tokens.list_tokens(session, after="", limit=10, active_only=False)
        active = tokens.list_tokens(session, after="", limit=10, active_only=True)
        first = tokens.list_tokens(session, after="", limit=2, active_only=False)
        rest = tokens.list_tokens(session, after=first[-1].token_id, limit=10, active_only=False)
    assert len(everything) == 5 and len(active) == 4
    assert made[0].row.token_id not in {t.token_id for t in active}
    assert [t.token_id for t in [*first, *rest]] == [t.token_id for t in everything]


def test_a_device_revoked_on_another_replica_is_refused_once_its_cache_entry_expires(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store.transaction() as session:
        secret = fleet.register_devices(
            session, [fleet.Registration("car-1", "ev6", "eu", "4.2", {})], NOW
        )["car-1"]
    token = f"device:car-1:{secret}"
    here, there = Authenticator(store, {}), Authenticator(store, {})
    assert there.authenticate(token).name == "car-1"  # cached on the other replica
    with store.transaction() as session:
        fleet.revoke(session, "car-1")
    here.forget_device("car-1")
    with pytest.raises(Unauthenticated):
        here.authenticate(token)
    assert there.authenticate(token).name == "car-1"  # within DEVICE_CACHE_SECONDS
    monkeypatch.setattr(auth_module.time, "monotonic", lambda: 10**12)
    with pytest.raises(Unauthenticated):
        there.authenticate(token)


def test_a_verified_token_is_kept_for_its_bounded_time_and_expiry_still_holds(
    store: Store,
) -> None:
    clock = ManualClock(NOW)
    kept = Authenticator(store, {}, clock, token_cache_seconds=300)
    unkept = Authenticator(store, {}, clock, token_cache_seconds=0)
    with store.transaction() as session:
        issued = tokens.create(
            session,
            display_name="dash",
            role="viewer",
            creator="root",
            now=NOW,
            expires_at=NOW + timedelta(seconds=30),
        )
    assert kept.authenticate(issued.secret).name == "dash"
    assert unkept.authenticate(issued.secret).name == "dash"
    # A change nobody announces (the row edited by hand): only the bound covers it.
    with store.transaction() as session:
        row = session.get(ApiTokenRow, issued.row.token_id)
        assert row is not None
        row.revoked_at = NOW
        session.add(row)
    assert kept.authenticate(issued.secret).name == "dash"
    with pytest.raises(Unauthenticated, match="not valid"):
        unkept.authenticate(issued.secret)
    # Expiry is the clock's, checked on every call, kept or not.
    clock.advance(timedelta(seconds=30))
    with pytest.raises(Unauthenticated, match="token expired"):
        kept.authenticate(issued.secret)
