"""Publishes committed desired states (the outbox) as retained MQTT messages."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from ota.runtime import Signal, Worker
from ota.store import desired
from ota.store.session import Store
from ota.transport.mqtt import MqttLink
from ota.transport.outbound import Shards

log = logging.getLogger(__name__)

BATCH = 2000
ACK_TIMEOUT_SECONDS = 30.0


class DesiredStatePublisher:
    """A worker that drains the desired-state outbox whenever desired states are committed."""

    def __init__(
        self,
        link: MqttLink,
        store: Store,
        *,
        holds_lease: Callable[[], bool] | None = None,
        poll_seconds: float = 5.0,
        fenced: Store | None = None,
        wake_on: Iterable[Signal] = (),
    ) -> None:
        # The link's publishing connections share the fleet, each device always on
        # the same one (ota.transport.outbound).
        self._shards = Shards(link.publishing, link.topics)
        self._store = store
        # Marking published goes through the lease's fenced store: a replica that
        # lost the lease while its batch was in flight records nothing, and the new
        # holder publishes those rows again (retained: the same message, harmless).
        self._fenced = fenced or store
        # Among replicas only the engine lease's holder publishes, so two replicas
        # never race to leave an older retained state behind a newer one. Commands
        # and the engine of this process wake it; it polls too, since a command
        # served by another replica cannot.
        self._holds_lease = holds_lease
        self._worker = Worker(
            "publish",
            self._step,
            interval=poll_seconds,
            wake_on=wake_on,
            active=holds_lease,
        )
        self.published = 0

    def start(self) -> None:
        # The first step runs at once: whatever a previous process committed but did not send.
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def wake(self) -> None:
        self._worker.wake()

    def _step(self) -> float | None:
        if not self._shards.all_connected():
            return 0.5  # look again soon: the connections reconnect by themselves
        # A pass that published something may have left more (committed meanwhile).
        return 0.0 if self._drain_once() else None

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
                if self._worker.stopping or (
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
        with self._fenced.transaction() as session:
            desired.mark_published(session, acked)
        self.published += len(acked)
