"""What the gRPC health service answers: SERVING only while this replica can do its job.

A replica whose broker link is down cannot publish desired states nor
ingest events, and one whose database does not answer fails nearly every
call: a load balancer or an orchestrator should send work elsewhere then.
The broker link is looked at on each check (a flag paho keeps); the
database is asked `SELECT 1` every few seconds, at once after any database
error, and on every check while it is down, so recovery shows quickly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2
from sqlalchemy import Engine, event

from ota.runtime import Worker

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServiceHealth:
    """The health answers of every service of one server, set together."""

    def __init__(self, servicer: health.HealthServicer, names: list[str]) -> None:
        self.servicer = servicer
        self._names = ["", *names]
        self._lock = threading.Lock()
        self._shut = False
        self.serving: bool | None = None  # None until first set

    def set(self, serving: bool) -> None:
        with self._lock:
            # Only changes reach the servicer: each set is a message on every Watch.
            if self._shut or serving == self.serving:
                return  # shutting down stays NOT_SERVING
            self.serving = serving
            for name in self._names:
                self.servicer.set(name, SERVING if serving else NOT_SERVING)

    def shutdown(self) -> None:
        """NOT_SERVING from now on, whatever any check finds (the server is stopping)."""
        with self._lock:
            self._shut = True
            self.serving = False
        self.servicer.enter_graceful_shutdown()


class DatabaseProbe:
    """Asks the database `SELECT 1` over a connection of its own.

    Not from the shared pool: under load every pooled connection may be busy,
    and waiting for one would read as the database being down.
    """

    def __init__(self, engine: Engine) -> None:
        # Same connect arguments and connect-time settings, separate connections.
        self._pool = engine.pool.recreate()

    def __call__(self) -> bool:
        try:
            connection = self._pool.connect()
        except Exception as exc:
            log.debug("database check could not connect: %s", exc)
            return False
        try:
            cursor = connection.cursor()
            cursor.execute("SELECT 1")
            cursor.fetchall()
            cursor.close()
        except Exception as exc:
            log.debug("database check failed: %s", exc)
            connection.invalidate()  # a dead connection is not handed out again
            return False
        finally:
            connection.close()
        return True

    def close(self) -> None:
        self._pool.dispose()


class HealthMonitor:
    """Keeps `ServiceHealth` true to the broker link and the database, on a worker."""

    def __init__(
        self,
        health_: ServiceHealth,
        *,
        broker_up: Callable[[], bool],
        database_up: Callable[[], bool],
        interval: float = 1.0,
        database_every: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_stop: Callable[[], None] = lambda: None,
    ) -> None:
        self._health = health_
        self._broker_up = broker_up
        self._database_up = database_up
        self._database_every = database_every
        self._monotonic = monotonic
        self._database_ok = True
        self._checked_at = float("-inf")
        self._suspect = False  # a database error was seen since the last check
        self._on_stop = on_stop
        self._worker = Worker("health", self.check, interval=interval)

    def watch_errors(self, engine: Engine) -> None:
        """Check the database at once whenever one of `engine`'s statements fails."""
        event.listen(engine, "handle_error", self._on_database_error)

    def _on_database_error(self, _context: object) -> None:
        self._suspect = True
        self._worker.wake()

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
        self._on_stop()

    def check(self) -> None:
        now = self._monotonic()
        if self._suspect or not self._database_ok or now - self._checked_at >= self._database_every:
            self._suspect = False
            self._checked_at = now
            self._database_ok = self._database_up()
        broker = self._broker_up()
        serving = broker and self._database_ok
        if serving != self._health.serving:
            if serving:
                log.info("health: SERVING (broker link up, database answers)")
            else:
                log.warning(
                    "health: NOT_SERVING (%s)",
                    ", ".join(
                        what
                        for what, ok in (
                            ("broker link down", broker),
                            ("database does not answer", self._database_ok),
                        )
                        if not ok
                    ),
                )
        self._health.set(serving)
