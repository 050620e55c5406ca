"""INSERT ... ON CONFLICT in the dialect of the session's database."""

from __future__ import annotations

from sqlalchemy import Insert, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session


def replacing_insert(session: Session, table: Table, keys: list[str]) -> Insert:
    """INSERT that overwrites every non-key column of an existing row (an upsert)."""
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(table)
        values = {c.name: pg.excluded[c.name] for c in table.columns if c.name not in keys}
        return pg.on_conflict_do_update(index_elements=keys, set_=values)
    lite = sqlite.insert(table)
    values = {c.name: lite.excluded[c.name] for c in table.columns if c.name not in keys}
    return lite.on_conflict_do_update(index_elements=keys, set_=values)
