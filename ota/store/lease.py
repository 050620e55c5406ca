"""Leases among control-plane replicas: conditional updates on one row per lease.

A lease row says who holds it (`holder`), until when (`expires_at`), and its
fencing `token`, which grows by one whenever the lease changes hands. Taking
it is a conditional UPDATE that succeeds only if the lease is free, expired
or (once, after a restart) already ours; renewing succeeds only for the
holder with the current token. Safety does not rest on clocks: a holder
proves itself with `fence` inside each of its write transactions, and that
no-op UPDATE also locks the row, so a takeover waits for the transaction in
flight and every later one of the old holder fails.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from ota.store.models import LeaseRow


def ensure(session: Session, name: str) -> None:
    """Create the lease row, free, unless it exists (concurrent replicas may race here)."""
    table = LeaseRow.__table__  # type: ignore[attr-defined]
    values = {"name": name, "holder": "", "token": 0}
    if session.get_bind().dialect.name == "postgresql":
        session.execute(postgresql.insert(table).values(values).on_conflict_do_nothing())
    else:
        session.execute(sqlite.insert(table).values(values).on_conflict_do_nothing())


def acquire(
    session: Session,
    name: str,
    holder: str,
    *,
    now: datetime,
    duration: timedelta,
    reclaim: bool,
) -> int | None:
    """Take the lease if it is free or expired; returns the new fencing token, or None.

    With `reclaim`, a lease still recorded for `holder` is taken back at once: it
    belongs to this replica's previous incarnation, which is gone (a restart).
    """
    ensure(session, name)
    takeable = [col(LeaseRow.holder) == "", col(LeaseRow.expires_at) < now]
    if reclaim:
        takeable.append(col(LeaseRow.holder) == holder)
    result = session.execute(
        update(LeaseRow)
        .where(col(LeaseRow.name) == name)
        .where(or_(*takeable))
        .values(
            holder=holder,
            token=col(LeaseRow.token) + 1,
            acquired_at=now,
            renewed_at=now,
            expires_at=now + duration,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = session.get(LeaseRow, name, populate_existing=True)
    return None if row is None else row.token


def renew(
    session: Session, name: str, holder: str, token: int, *, now: datetime, duration: timedelta
) -> bool:
    """Extend the lease for its holder; False if another replica took it meanwhile."""
    result = session.execute(
        update(LeaseRow)
        .where(col(LeaseRow.name) == name)
        .where(col(LeaseRow.holder) == holder)
        .where(col(LeaseRow.token) == token)
        .values(renewed_at=now, expires_at=now + duration)
    )
    return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def release(session: Session, name: str, holder: str, token: int, *, now: datetime) -> bool:
    """Give the lease up (a clean shutdown), so another replica need not wait for expiry."""
    result = session.execute(
        update(LeaseRow)
        .where(col(LeaseRow.name) == name)
        .where(col(LeaseRow.holder) == holder)
        .where(col(LeaseRow.token) == token)
        .values(holder="", expires_at=now)
    )
    return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def fence(session: Session, name: str, holder: str, token: int) -> bool:
    """True if `holder` still holds the lease with `token`, and lock it until commit.

    A no-op conditional UPDATE: on PostgreSQL it takes the row lock, on SQLite
    the write lock, so no takeover can commit while the caller's transaction runs.
    """
    result = session.execute(
        update(LeaseRow)
        .where(col(LeaseRow.name) == name)
        .where(col(LeaseRow.holder) == holder)
        .where(col(LeaseRow.token) == token)
        .values(token=token)
    )
    return result.rowcount == 1  # type: ignore[attr-defined, no-any-return]


def current(session: Session, name: str) -> LeaseRow | None:
    """The lease row as stored, or None if no replica ever asked for it."""
    return session.get(LeaseRow, name, populate_existing=True)
