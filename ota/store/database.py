"""Opening the database and bringing its schema up to date with Alembic."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError

from ota.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

_MIGRATIONS = Path(__file__).parent / "migrations"
# The gRPC server's 32 workers plus the control plane's own threads, with room.
SQLITE_POOL_SIZE = 48
# How long a PostgreSQL connection attempt may take before it counts as a failure
# (a firewalled host would otherwise hold `ota serve` for the OS's TCP timeout).
PG_CONNECT_TIMEOUT_SECONDS = 10
EXAMPLES = "sqlite:////var/lib/ota/ota.db or postgresql://USER:PASSWORD@HOST:5432/DBNAME"
# What people write for PostgreSQL, all meaning the one driver ota ships with.
_POSTGRES_SCHEMES = ("postgres", "postgresql", "postgresql+psycopg")


def database_url(url: str) -> URL:
    """`url` parsed, with the spellings of PostgreSQL's scheme made the driver's own.

    `postgres://` (Heroku, libpq) and `postgresql://` mean what the operator
    expects: PostgreSQL through psycopg 3. Other drivers are refused, naming the two
    that work.
    """
    if not url.strip():
        raise InvalidArgument(
            f"is required: set it in the config file, OTA_DATABASE_URL or --database-url "
            f"(e.g. {EXAMPLES})",
            field="database_url",
        )
    try:
        parsed = make_url(url.strip())
    except ArgumentError as exc:
        raise InvalidArgument(
            f"{_redacted_text(url)!r} is not a database URL; write {EXAMPLES}",
            field="database_url",
        ) from exc
    if parsed.drivername in _POSTGRES_SCHEMES:
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return parsed
    raise InvalidArgument(
        f"{parsed.drivername}:// is not supported: use {EXAMPLES}", field="database_url"
    )


def redacted(url: str) -> str:
    """The URL for a log line: the password replaced by ***."""
    try:
        return database_url(url).render_as_string(hide_password=True)
    except InvalidArgument:
        return _redacted_text(url)


def _redacted_text(url: str) -> str:
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


def open_database(url: str) -> Engine:
    """An engine for `url` (sqlite:///file or postgresql://...); connects lazily."""
    parsed = database_url(url)
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot create {folder} for the SQLite database: {exc.strerror}",
                    field="database_url",
                ) from exc
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
    connect_args = (
        {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
    )
    try:
        return create_engine(
            parsed, pool_size=10, max_overflow=10, pool_pre_ping=True, connect_args=connect_args
        )
    except ModuleNotFoundError as exc:
        # The driver is an extra, so an operator who installed plain `ota` meets this first.
        if exc.name != "psycopg":
            raise
        raise InvalidArgument(
            "PostgreSQL needs the psycopg driver: install ota with its postgres extra "
            "(pip install 'ota-VERSION-py3-none-any.whl[postgres]'; docs/OPERATIONS.md, Installing)",
            field="database_url",
        ) from exc


def connect(url: str) -> Engine:
    """Open the database and make a first connection, or say in one line what to fix.

    A database that is down, missing or refusing the user is reported as such,
    with the remedy, not as a traceback from the first query that needs it.
    """
    engine = open_database(url)
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        raise Unavailable(
            connection_problem(engine.url, str(exc.orig)), field="database_url"
        ) from exc
    return engine


def connection_problem(url: URL, error: str) -> str:
    """What went wrong connecting to `url`, and how to fix it, in one line."""
    shown = url.render_as_string(hide_password=True)
    # libpq adds hint lines ("Is the server running ..."); the first line says it.
    first = " ".join(error.strip().splitlines()[0].split()) if error.strip() else "unknown error"
    if url.drivername.startswith("sqlite"):
        return (
            f"cannot open the SQLite database {url.database}: {first}; check that its "
            "directory exists and is writable by this user"
        )
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    missing = re.search(r'database "([^"]+)" does not exist', error)
    if missing:
        return (
            f"database {missing.group(1)!r} does not exist on the PostgreSQL server at {where}; "
            f"create it (createdb -h {url.host or 'localhost'} -p {url.port or 5432} "
            f"-U {url.username or 'postgres'} {missing.group(1)}) or fix the name in {shown}"
        )
    if re.search(r"password authentication failed|role .* does not exist|no password", error):
        return (
            f"the PostgreSQL server at {where} refused user {url.username!r}: {_fatal(first)}; "
            "check the user and password in database_url"
        )
    return (
        f"cannot connect to PostgreSQL at {where} ({shown}): {_fatal(first)}; "
        "check that it is running and reachable from here, and the host and port"
    )


def _fatal(text: str) -> str:
    """The server's own words (after FATAL:, or the last 'failed:'), without the prefix."""
    for marker in ("FATAL:", "failed:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    return text.strip().removesuffix(".")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while ingest writes; NORMAL sync is durable across
    # process crashes, which is the failure the control plane must survive.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# "setup plugin alembic.autogenerate…", logged as alembic loads, at every start,
# says nothing about the schema.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def alembic_config() -> Config:
    # Imported here: alembic logs as it loads its plugins, and `ota serve`'s first log
    # lines belong to what it runs on (ota.app.announce).
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


# PostgreSQL's SQLSTATE for "insufficient privilege".
_NO_PRIVILEGE = "42501"


def migrate(engine: Engine) -> None:
    """Upgrade the schema to the newest migration (idempotent).

    A user that may connect but not create tables (PostgreSQL 15 no longer lets
    everyone create in `public`) is told what to grant, in one line.
    """
    from alembic import command

    config = alembic_config()
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _NO_PRIVILEGE:
            raise
        url = engine.url
        first = " ".join(str(exc.orig).strip().splitlines()[0].split())
        raise Unavailable(
            f"user {url.username!r} may not create ota's tables in database {url.database!r} "
            f"({first}); make it the database's owner (createdb -O {url.username} ...) or "
            f"GRANT CREATE ON SCHEMA public TO {url.username}",
            field="database_url",
        ) from exc
