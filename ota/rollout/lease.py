"""The engine lease: which of several `ota serve` replicas drives the work that runs once.

Every replica serves gRPC and ingests its share of device events; only the
holder of the `engine` lease runs the rollout engine, publishes desired
states and re-signs the timestamp. The lease lives in the database
(`ota.store.lease`): the holder renews it every `renew_every` and believes
it holds it only until `duration` after the start of its last successful
renewal, measured on its own monotonic clock, so it stops before any other
replica may take over. Writes of the holder go through `FencedStore`, whose
transactions first prove the lease is still held with the same token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from ota.clock import Clock
from ota.errors import Aborted, InvalidArgument, OtaError
from ota.runtime import Worker
from ota.store import lease as lease_rows
from ota.store.session import Store

log = logging.getLogger(__name__)

ENGINE_LEASE = "engine"


class LeaseLost(Aborted):
    """This replica no longer holds the lease; another one does the work now."""


class Lease:
    """Holds, or waits for, one named lease on a thread of its own."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        holder: str,
        duration_seconds: float = 15.0,
        renew_seconds: float = 5.0,
        name: str = ENGINE_LEASE,
        on_acquired: Callable[[], None] = lambda: None,
        on_lost: Callable[[], None] = lambda: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not holder:
            raise InvalidArgument("a replica needs a non-empty id", field="replica_id")
        if duration_seconds <= 0:
            raise InvalidArgument(
                f"must be positive, got {duration_seconds}", field="lease_duration_seconds"
            )
        if not 0 < renew_seconds < duration_seconds:
            raise InvalidArgument(
                f"must be positive and shorter than lease_duration_seconds "
                f"({duration_seconds}), got {renew_seconds}",
                field="lease_renew_seconds",
            )
        self.name = name
        self.holder = holder
        self._store = store
        self._clock = clock
        self._duration = duration_seconds
        self._renew = renew_seconds
        self.on_acquired = on_acquired
        self.on_lost = on_lost
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._token: int | None = None
        self._valid_until = 0.0
        # Until this replica first holds the lease, a row naming it is its previous
        # incarnation's (a restart under the same id) and is taken back at once.
        self._reclaim = True
        self._lapsed = False  # the term ran out while the database was away (logged once)
        self._worker = Worker("lease", self._renew_once, interval=renew_seconds)

    @property
    def token(self) -> int | None:
        """The fencing token while the lease is held, else None."""
        with self._lock:
            return self._token if self._monotonic() < self._valid_until else None

    def held(self) -> bool:
        return self.token is not None

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Stop renewing and hand the lease over (call once the lease's work has stopped)."""
        self._worker.stop()
        with self._lock:
            token, self._token, self._valid_until = self._token, None, 0.0
        if token is None:
            return
        try:
            with self._store.transaction() as session:
                lease_rows.release(session, self.name, self.holder, token, now=self._clock.now())
            log.info("released the %s lease", self.name)
        except OtaError as exc:
            log.warning("could not release the %s lease; it expires by itself: %s", self.name, exc)

    def _renew_once(self) -> None:
        self.tick()

    def tick(self) -> None:
        """One attempt: renew the lease if held, else try to take it."""
        started = self._monotonic()
        now = self._clock.now()
        duration = timedelta(seconds=self._duration)
        with self._lock:
            token = self._token
        try:
            with self._store.transaction() as session:
                if token is not None:
                    if lease_rows.renew(
                        session, self.name, self.holder, token, now=now, duration=duration
                    ):
                        acquired = token
                    else:
                        acquired = None
                else:
                    acquired = lease_rows.acquire(
                        session,
                        self.name,
                        self.holder,
                        now=now,
                        duration=duration,
                        reclaim=self._reclaim,
                    )
                other = None if acquired is not None else lease_rows.current(session, self.name)
        except OtaError as exc:
            # The database is away: the lease stays ours until its term runs out,
            # then the work stops; a renewal once it is back resumes it if nobody
            # took over meanwhile.
            log.warning("could not renew the %s lease: %s", self.name, exc)
            with self._lock:
                lapsed = self._token is not None and self._monotonic() >= self._valid_until
                lost = lapsed and not self._lapsed
                if lost:
                    log.warning("the %s lease ran out: stopping its work", self.name)
                self._lapsed = lapsed
            if lost:
                self.on_lost()
            return
        with self._lock:
            was_held = self._token is not None and self._monotonic() < self._valid_until
            if acquired is None:
                self._token, self._valid_until = None, 0.0
            else:
                self._token = acquired
                self._valid_until = started + self._duration
                self._reclaim = False
                self._lapsed = False
        if acquired is None:
            if token is not None:
                log.warning(
                    "the %s lease was taken over by %s (token %s): stopping its work",
                    self.name,
                    other.holder if other else "?",
                    other.token if other else "?",
                )
                self.on_lost()
            return
        if token is None or not was_held:
            log.info("holds the %s lease as %s (token %d)", self.name, self.holder, acquired)
            self.on_acquired()

    def fence(self, session: Session) -> None:
        """Prove, inside the caller's transaction, that this replica still holds the lease."""
        token = self.token
        if token is None or not lease_rows.fence(session, self.name, self.holder, token):
            raise LeaseLost(f"replica {self.holder} does not hold the {self.name} lease")


class FencedStore(Store):
    """The store as the lease holder's work writes it: each transaction is fenced.

    A transaction first checks, and locks, the lease row; if another replica
    holds the lease now it fails with `LeaseLost` before writing anything.
    """

    def __init__(self, engine: Engine, lease: Lease) -> None:
        super().__init__(engine)
        self.lease = lease

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with super().transaction() as session:
            self.lease.fence(session)
            yield session
