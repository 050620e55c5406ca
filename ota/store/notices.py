"""Hearing other replicas' changes: LISTEN on a dedicated PostgreSQL connection.

Writers NOTIFY a channel of `ota.store.changes` with an id (a rollout that
changed, a token revoked) in the transaction that made the change. This
thread holds one connection of its own (psycopg, autocommit, outside the
pool), LISTENs on every channel, and passes each (channel, id) on.
A connection that fails, or is dropped by the server, says so (`on_live(False)`),
since changes committed meanwhile are not delivered later; the thread
reconnects, LISTENs again, and says `on_live(True)` only then.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine

from ota.store.changes import CHANNELS
from ota.store.database import PG_CONNECT_TIMEOUT_SECONDS

log = logging.getLogger(__name__)

# Name of the connection in pg_stat_activity, for operators (and tests).
APPLICATION_NAME = "ota change notices"
# TCP keepalives find a peer that vanished without closing (a cut network):
# about KEEPALIVE_IDLE + 3 * KEEPALIVE_INTERVAL seconds.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5


class ChangeNotices:
    """A thread listening for other replicas' changes on PostgreSQL."""

    def __init__(
        self,
        engine: Engine,
        on_change: Callable[[str, str], None],
        on_live: Callable[[bool], None],
        *,
        retry_seconds: float = 1.0,
        poll_seconds: float = 1.0,
    ) -> None:
        url = engine.url
        self._conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._timeout: dict[str, Any] = (
            {}
            if "connect_timeout" in url.query
            else {"connect_timeout": PG_CONNECT_TIMEOUT_SECONDS}
        )
        self._on_change = on_change
        self._on_live = on_live
        self._retry = retry_seconds
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ota-change-notices", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        # Imported here: psycopg comes with the `postgres` extra, and a control plane
        # on SQLite (a wheel installed without it) never starts this thread.
        import psycopg

        failures = 0
        while not self._stop.is_set():
            try:
                self._listen(psycopg)
                failures = 0
            except psycopg.Error as exc:
                failures += 1
                # The first failure in a row is worth a warning; a database that
                # stays down is already being reported by everything else.
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "change notices lost, reconnecting: %s", exc)
            except Exception:
                # A bug here must not end the thread: the caches would stay off.
                log.exception("change notices failed, reconnecting")
            self._stop.wait(self._retry)

    def _listen(self, psycopg: Any) -> None:
        with psycopg.connect(
            self._conninfo,
            autocommit=True,
            application_name=APPLICATION_NAME,
            keepalives=1,
            keepalives_idle=KEEPALIVE_IDLE,
            keepalives_interval=KEEPALIVE_INTERVAL,
            keepalives_count=3,
            **self._timeout,
        ) as conn:
            for channel in CHANNELS:
                conn.execute(f"LISTEN {channel}")
            self._on_live(True)
            try:
                while not self._stop.is_set():
                    for notice in conn.notifies(timeout=self._poll):
                        self._on_change(notice.channel, notice.payload)
            finally:
                self._on_live(False)
