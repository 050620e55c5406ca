"""Telemetry ingest: batches from the inbox, one transaction, acks after commit."""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import NamedTuple, Protocol

from ota.clock import Clock
from ota.errors import Unavailable
from ota.runtime import Worker
from ota.store import fleet
from ota.store.ingest import IncomingEvent, count_drops, ingest_events
from ota.store.session import Store
from ota.transport.codec import Dropped, ReportedPresence, decode_event, decode_presence
from ota.transport.mqtt import InboundMessage, MqttLink

log = logging.getLogger(__name__)


class Admission(Protocol):
    """The per-device flood guard (DeviceRateLimiter, or a worker's line to its parent's)."""

    def admit_many(self, device_ids: Sequence[str]) -> list[bool]: ...


class BatchDone(NamedTuple):
    """What one committed batch (or one refused message) changed in the counters."""

    stored: int
    dropped: Counter[str]
    progressed: frozenset[str]  # rollouts it stored new events of: their progress moved


class _Routed(NamedTuple):
    """A message with what its topic and its device's rate say, decided once per message.

    Not again when its batch is retried: a retry must not spend the device's tokens twice.
    """

    message: InboundMessage
    device_id: str  # "" when the topic is no device topic
    kind: str
    over_limit: bool


class Ingester:
    def __init__(
        self,
        link: MqttLink,
        store: Store,
        clock: Clock,
        *,
        batch_size: int = 500,
        max_payload_bytes: int = 64 * 1024,
        rate_limiter: Admission | None = None,
        on_batch: Callable[[BatchDone], None] | None = None,
    ) -> None:
        self._limiter = rate_limiter
        # Called on the ingest thread after each commit; the counters already include it.
        self.on_batch = on_batch
        self._link = link
        self._store = store
        self._clock = clock
        self._batch_size = batch_size
        self._max_payload = max_payload_bytes
        # The step blocks on the inbox itself, so the worker's interval only
        # matters after a failure.
        self._worker = Worker("ingest", self._ingest_once, interval=1.0)
        self.stored = 0
        self.dropped: Counter[str] = Counter()
        # Receipt to commit of the oldest message in the last committed batch.
        self.lag_seconds = 0.0

    def backlog(self) -> int:
        """Messages received from the broker and not yet committed."""
        return self._link.inbox.qsize()

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def _ingest_once(self) -> float:
        batch = self._route(self._take_batch())
        if batch:
            self._ingest(batch)
        return 0.0

    def _ingest(self, batch: list[_Routed]) -> None:
        delay = 0.1
        while not self._worker.stopping:
            try:
                self._process(batch)
                break
            except Unavailable as exc:
                # Not acknowledged: retried here, and redelivered by the broker
                # if this process dies meanwhile.
                log.warning("ingest paused, database unavailable: %s", exc)
                self._worker.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                # Not the database being away: some message the store refuses.
                # Find it alone, so one device cannot stall the whole fleet.
                log.exception("ingest batch refused by the store; isolating the cause")
                self._process_one_by_one(batch)
                break

    def _process_one_by_one(self, batch: list[_Routed]) -> None:
        for routed in batch:
            while not self._worker.stopping:
                try:
                    self._process([routed])
                    break
                except Unavailable:
                    self._worker.sleep(1.0)
                except Exception:
                    log.exception("dropping a message the store refuses: %s", routed.message.topic)
                    with self._store.transaction() as session:
                        count_drops(session, Counter({"store_refused": 1}))
                    self._link.ack(routed.message)
                    self.dropped["store_refused"] += 1
                    self._report(BatchDone(0, Counter({"store_refused": 1}), frozenset()))
                    break

    def _route(self, batch: list[InboundMessage]) -> list[_Routed]:
        parsed = [self._link.topics.parse(message.topic) or ("", "") for message in batch]
        if self._limiter is None or not batch:
            admitted = [True] * len(batch)
        else:
            # One question per batch: a worker process asks its parent's limiter.
            asked = [device_id for device_id, _ in parsed if device_id]
            answers = iter(self._limiter.admit_many(asked))
            admitted = [next(answers) if device_id else True for device_id, _ in parsed]
        return [
            _Routed(message, device_id, kind, not ok)
            for message, (device_id, kind), ok in zip(batch, parsed, admitted, strict=True)
        ]

    def _take_batch(self) -> list[InboundMessage]:
        try:
            first = self._link.inbox.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._link.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _process(self, batch: list[_Routed]) -> None:
        events: list[IncomingEvent] = []
        presence: list[ReportedPresence] = []
        dropped: Counter[str] = Counter()
        for message, device_id, kind, over_limit in batch:
            try:
                if over_limit:
                    dropped["rate_limited"] += 1  # logged by the limiter, once per interval
                elif kind == "events":
                    events.append(
                        decode_event(device_id, message.payload, max_bytes=self._max_payload)
                    )
                elif kind == "state":
                    if message.payload:  # an empty retained payload clears state
                        presence.append(
                            decode_presence(device_id, message.payload, max_bytes=self._max_payload)
                        )
                else:
                    raise Dropped("bad_topic", message.topic)
            except Dropped as drop:
                dropped[drop.reason] += 1
                log.warning(
                    "dropped device message: %s",
                    drop,
                    extra={"device_id": device_id or None, "reason": drop.reason},
                )
        now = self._clock.now()
        with self._store.transaction() as session:
            result = ingest_events(session, events, now) if events else None
            if presence:
                fleet.mark_seen(session, _presence_rows(presence, now))
            count_drops(session, dropped)
        for routed in batch:
            self._link.ack(routed.message)
        self.lag_seconds = time.monotonic() - min(r.message.received for r in batch)
        if result is not None:
            self.stored += result.stored
            dropped.update(result.dropped)
            for reason, n in result.dropped.items():
                log.warning("dropped %d events: %s", n, reason)
        self.dropped.update(dropped)
        self._report(
            BatchDone(
                result.stored if result else 0,
                dropped,
                result.progressed if result else frozenset(),
            )
        )

    def _report(self, done: BatchDone) -> None:
        if self.on_batch is None:
            return
        try:
            self.on_batch(done)
        except Exception:
            # Committed and acknowledged already: a failing listener must not make
            # the batch look refused by the store.
            log.exception("ingest: the batch listener failed")


def _presence_rows(
    presence: list[ReportedPresence], now: datetime
) -> list[tuple[str, datetime, bool | None]]:
    return [(p.device_id, now, p.online) for p in presence]
