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
        self._link = link
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
        """Publish one batch; True if there may be more."""
        if self._holds_lease is not None and not self._holds_lease():
            return False
        if not self._link.connected.is_set():
            time.sleep(0.5)
            self._wake.set()
            return False
        with self._store.transaction() as session:
            pending = desired.unpublished(session, BATCH)
        if not pending:
            return False
        infos = [
            (
                row.device_id,
                row.generation,
                self._link.publish_retained(self._link.topics.desired(row.device_id), row.envelope),
            )
            for row in pending
        ]
        done: list[tuple[str, int]] = []
        deadline = time.monotonic() + ACK_TIMEOUT_SECONDS
        for device_id, generation, info in infos:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                info.wait_for_publish(timeout=remaining)
            except (RuntimeError, ValueError):
                continue
            if info.is_published():
                done.append((device_id, generation))
        with self._store.transaction() as session:
            desired.mark_published(session, done)
        self.published += len(done)
        if len(done) < len(infos):
            log.warning("%d desired states not acknowledged; retrying", len(infos) - len(done))
            time.sleep(0.5)
        return True
