"""Opening the database and bringing its schema up to date with Alembic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ota.errors import InvalidArgument

_MIGRATIONS = Path(__file__).parent / "migrations"
# The gRPC server's 32 workers plus the control plane's own threads, with room.
SQLITE_POOL_SIZE = 48


def open_database(url: str) -> Engine:
    """An engine for `url` (sqlite:///file or postgresql+psycopg://...)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise InvalidArgument(f"{url!r} is not a database URL", field="database_url") from exc
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Every gRPC worker, the engine, the ingester and the publisher may hold a
        # connection at once. A pool smaller than that opens and closes overflow
        # connections per checkout, re-running the PRAGMAs each time; SQLite
        # connections are cheap to keep, so keep them all. Last in, first out: the
        # hot paths (one ingest thread, the engine) get back the connection they just
        # used, with its page cache warm, instead of cycling through all of them and
        # filling every connection's own page cache (2 MiB each) in turn.
        in_memory = not parsed.database or parsed.database == ":memory:"
        pool: dict[str, Any] = (
            {} if in_memory else {"pool_size": SQLITE_POOL_SIZE, "pool_use_lifo": True}
        )
        engine = create_engine(
            parsed, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    try:
        return create_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True)
    except ModuleNotFoundError as exc:
        # The driver is an extra, so an operator who installed plain `ota` meets this first.
        if exc.name != "psycopg":
            raise
        raise InvalidArgument(
            "PostgreSQL needs the psycopg driver: install ota with its postgres extra "
            "(pip install 'ota-VERSION-py3-none-any.whl[postgres]'; docs/OPERATIONS.md, Installing)",
            field="database_url",
        ) from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while ingest writes; NORMAL sync is durable across
    # process crashes, which is the failure the control plane must survive.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (idempotent)."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
