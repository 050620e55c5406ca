"""Token lifetimes on SQLite and PostgreSQL: refused once expired, with a clear status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ota.api.auth import Authenticator
from ota.api.tokens import lifetime
from ota.clock import ManualClock, utc
from ota.errors import InvalidArgument, Unauthenticated
from ota.store import tokens
from ota.store.models import ApiTokenRow
from ota.store.session import Store

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def test_an_expired_token_is_refused_and_its_last_use_kept(store: Store) -> None:
    clock = ManualClock(NOW)
    auth = Authenticator(store, {}, clock)
    with store.transaction() as session:
        issued = tokens.create(
            session,
            display_name="ci",
            role="release",
            creator="root",
            now=NOW,
            expires_at=NOW + timedelta(days=30),
        )
    assert auth.authenticate(issued.secret).name == "ci"
    clock.advance(timedelta(days=30) - timedelta(seconds=1))
    assert auth.authenticate(issued.secret).name == "ci"
    clock.advance(timedelta(seconds=1))
    with pytest.raises(Unauthenticated, match="token expired"):
        auth.authenticate(issued.secret)
    with store.transaction() as session:
        row = session.get(ApiTokenRow, issued.row.token_id)
        assert row is not None and row.last_used_at is not None
        assert utc(row.last_used_at) == NOW + timedelta(days=30) - timedelta(seconds=1)
        active = tokens.list_tokens(session, after="", limit=10, active_only=True, now=clock.now())
        every = tokens.list_tokens(session, after="", limit=10, active_only=False, now=clock.now())
    assert active == [] and len(every) == 1


def test_lifetimes_default_by_role_and_refuse_nonsense() -> None:
    assert lifetime("viewer", None, never=False) == timedelta(days=90)
    assert lifetime("release", None, never=False) == timedelta(days=90)
    assert lifetime("admin", None, never=False) is None
    assert lifetime("viewer", None, never=True) is None
    assert lifetime("admin", timedelta(hours=1), never=False) == timedelta(hours=1)
    for ttl, never in ((timedelta(0), False), (timedelta(days=4000), False), (timedelta(1), True)):
        with pytest.raises(InvalidArgument) as info:
            lifetime("viewer", ttl, never=never)
        assert info.value.field == "ttl"
