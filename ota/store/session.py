"""Transactions: the one place that commits, and where storage errors become ota errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session

from ota.errors import Aborted, Unavailable
from ota.store import audit, changes


class Store:
    """The database of one control plane: hands out sessions, commits them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session committed on success and rolled back on any error."""
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                with session.begin():
                    yield session
                    changed = changes.announce(session)
                # Committed: now what it did may be told (audit lines, ota.store.audit).
                audit.flush_logs(session)
            if changed:
                changes.committed(self.engine, changed)
        except IntegrityError as exc:
            # A unique key raced: a concurrent request created the same thing.
            raise Aborted(
                "a concurrent request changed the same resource; read it again and retry"
            ) from exc
        except OperationalError as exc:
            # "database is locked", a lost connection: the caller may retry.
            raise Unavailable(f"the database is unavailable, retry: {exc.orig}") from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise Unavailable("the database connection was lost, retry") from exc
            raise
