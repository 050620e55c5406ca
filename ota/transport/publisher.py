"""Publishes committed desired states (the outbox) as retained MQTT messages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ota.errors import OtaError
from ota.store import desired
from ota.store.session import Store
from ota.transport.mqtt import MqttLink
from ota.transport.outbound import Shards

log = logging.getLogger(__name__)

BATCH = 2000
ACK_TIMEOUT_SECONDS = 30.0


class DesiredStatePublisher:
    """A thread that drains the desired-state outbox whenever it is woken."""

    def __init__(
        self,
        link: MqttLink,
        store: Store,
        *,
        holds_lease: Callable[[], bool] | None = None,
        poll_seconds: float = 5.0,
    ) -> None:
        # The link's publishing connections share the fleet, each device always on
        # the same one (ota.transport.outbound).
        self._shards = Shards(link.publishing, link.topics)
        self._store = store
        # Among replicas only the engine lease's holder publishes, so two replicas
        # never race to leave an older retained state behind a newer one. It polls,
        # since a command served by another replica cannot wake it.
        self._holds_lease = holds_lease
        self._poll = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ota-publish", daemon=True)
        self.published = 0

    def start(self) -> None:
        self._wake.set()  # publish whatever a previous process committed but did not send
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=self._poll)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self._drain_once():
                    pass
            except OtaError as exc:
                log.warning("publishing desired states failed, will retry: %s", exc)
                self._stop.wait(1.0)
                self._wake.set()
            except Exception:
                # A bug must not silently end publishing for the whole fleet.
                log.exception("publishing desired states failed unexpectedly; retrying")
                self._stop.wait(5.0)
                self._wake.set()

    def _drain_once(self) -> bool:
        """One pass over the outbox, pipelined; True if anything was published.

        The outbox is read in device-id order, a batch at a time, while what
        was already handed to the connections is still being acknowledged:
        each connection is kept sending until the pass ends. Acknowledged
        states are marked published a batch at a time; what is not
        acknowledged stays unpublished and the next pass sends it again.
        """
        if self._holds_lease is not None and not self._holds_lease():
            return False
        if not self._shards.all_connected():
            time.sleep(0.5)
            self._wake.set()
            return False
        try:
            return self._pass()
        finally:
            # Whatever ended the pass (done, a lost lease, an error), nothing of it is
            # kept: what was not acknowledged is still unpublished in the outbox.
            self._shards.abandon()

    def _pass(self) -> bool:
        after = ""
        exhausted = False
        acked: list[tuple[str, int]] = []
        published = refused = 0
        last_progress = time.monotonic()
        while True:
            if not exhausted and self._shards.queued < BATCH:
                if self._stop.is_set() or (
                    self._holds_lease is not None and not self._holds_lease()
                ):
                    break
                with self._store.transaction() as session:
                    pending = desired.unpublished(session, BATCH, after=after)
                exhausted = len(pending) < BATCH
                for row in pending:
                    self._shards.enqueue(row.device_id, row.generation, row.envelope)
                if pending:
                    after = pending[-1].device_id
            sent, outcomes = self._shards.pump()
            for outcome in outcomes:
                if outcome.accepted:
                    acked.append((outcome.device_id, outcome.generation))
                else:
                    refused += 1
            if sent or outcomes:
                last_progress = time.monotonic()
            if len(acked) >= BATCH or (acked and exhausted and not self._shards.in_flight):
                self._mark(acked)
                published += len(acked)
                acked = []
            if exhausted and not self._shards.queued and not self._shards.in_flight:
                break
            if time.monotonic() - last_progress > ACK_TIMEOUT_SECONDS:
                log.warning("%d desired states not acknowledged; retrying", self._shards.abandon())
                time.sleep(0.5)
                break
            if not sent and (exhausted or self._shards.queued >= BATCH):
                self._shards.wait(timeout=0.5)
        if acked:
            self._mark(acked)
            published += len(acked)
        if refused:
            log.warning("the broker refused %d desired states; retrying", refused)
            time.sleep(0.5)
        return published > 0

    def _mark(self, acked: list[tuple[str, int]]) -> None:
        with self._store.transaction() as session:
            desired.mark_published(session, acked)
        self.published += len(acked)
