"""SQL text run on the driver with plain tuples, for the statements of the ingest path.

SQLAlchemy runs every bound parameter and every result value of a Core
statement through its type's conversion, per row, on every execution. At
ingest's rates that machinery costs more than the database's own work
(docs/PERFORMANCE.md, telemetry-ingest). Here the SQL is written once, in the
driver's parameter style, and run with `exec_driver_sql`: errors are still
SQLAlchemy's (so `Store.transaction` still maps them), and only the values
that need a conversion (the datetimes) get one, SQLAlchemy's own, applied by
the caller where it is needed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Column
from sqlmodel import Session

T = TypeVar("T")


def padded(items: Sequence[T]) -> list[T]:
    """`items`, with the last repeated up to the next power of two.

    Statements here are written for a number of rows or list items, and sqlite3
    keeps up to 128 prepared statements per connection: about half a MiB each for
    a 500-row INSERT, so one per distinct count would hold tens of MiB. Padded,
    each statement has a few shapes. Where they are used, repeats change nothing:
    an IN list, an INSERT ... ON CONFLICT DO NOTHING (the repeat conflicts with the
    original, and RETURNING names the row once), an UPDATE from identical rows.
    """
    if not items:
        return []
    shape = 1 << (len(items) - 1).bit_length()
    return [*items, *[items[-1]] * (shape - len(items))]


class PlainSQL:
    """The session's connection, for SQL text with positional parameters."""

    def __init__(self, session: Session) -> None:
        self._connection = session.connection()
        dialect = self._connection.dialect
        self.postgresql = dialect.name == "postgresql"
        # sqlite3 takes qmark; psycopg takes %s whatever style SQLAlchemy uses with it.
        self.marker = "?" if dialect.paramstyle == "qmark" else "%s"

    def markers(self, count: int) -> str:
        """`count` parameter markers, comma-separated (for IN lists and VALUES rows)."""
        return ", ".join([self.marker] * count)

    def rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of one statement, as the driver returns them."""
        return [tuple(row) for row in self._connection.exec_driver_sql(sql, tuple(params)).all()]

    def select(
        self, columns: Sequence[str], rest: str, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """`SELECT columns rest`: its rows, as `rows` returns them.

        On SQLite the rows come back as one JSON array, in one statement step:
        sqlite3 releases the GIL around every step, one per row, and each release
        hands it to paho's network thread, which always waits for it. JSON keeps
        SQLite's values as they are (text, integers, NULL).
        """
        names = ", ".join(columns)
        if self.postgresql:
            return self.rows(f"SELECT {names} {rest}", params)
        (document,) = self.rows(
            f"SELECT json_group_array(json_array({names})) FROM (SELECT {names} {rest})", params
        )[0]
        return [tuple(row) for row in json.loads(document)]

    def execute(self, sql: str, params: Sequence[Any]) -> None:
        """One statement that returns no rows."""
        self._connection.exec_driver_sql(sql, tuple(params))

    def execute_many(self, sql: str, params: Sequence[tuple[Any, ...]]) -> None:
        """One statement for each tuple: the driver's executemany."""
        if params:
            self._connection.exec_driver_sql(sql, list(params))


class TimeConversion:
    """What SQLAlchemy does to a datetime column's values on the way in and out.

    On SQLite, datetimes are stored as text; on PostgreSQL they pass as they
    are. Reading is left to the caller, who converts only the values it uses.
    """

    def __init__(self, column: Column[Any], session: Session) -> None:
        dialect = session.get_bind().dialect
        impl = column.type.dialect_impl(dialect)
        self._bind: Callable[[Any], Any] | None = impl.bind_processor(dialect)
        self._result: Callable[[Any], Any] | None = impl.result_processor(dialect, None)
        # The last value converted: a batch writes its own `now` into every row it changes.
        self._last: tuple[datetime | None, Any] = (None, None)

    def to_db(self, value: datetime | None) -> Any:
        if self._bind is None or value is None:
            return value
        if value is not self._last[0]:
            self._last = (value, self._bind(value))
        return self._last[1]

    def from_db(self, value: Any) -> datetime | None:
        converted = self._result(value) if self._result is not None else value
        assert converted is None or isinstance(converted, datetime)
        return converted
