"""Telemetry ingest: batches from the inbox, one transaction, acks after commit."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from datetime import datetime

from ota.clock import Clock
from ota.errors import Unavailable
from ota.store import fleet
from ota.store.ingest import IncomingEvent, count_drops, ingest_events
from ota.store.session import Store
from ota.transport.codec import Dropped, ReportedPresence, decode_event, decode_presence
from ota.transport.mqtt import InboundMessage, MqttLink
from ota.transport.ratelimit import DeviceRateLimiter

log = logging.getLogger(__name__)


class Ingester:
    def __init__(
        self,
        link: MqttLink,
        store: Store,
        clock: Clock,
        *,
        batch_size: int = 500,
        max_payload_bytes: int = 64 * 1024,
        rate_limiter: DeviceRateLimiter | None = None,
    ) -> None:
        self._limiter = rate_limiter
        self._limited: set[int] = set()
        self._link = link
        self._store = store
        self._clock = clock
        self._batch_size = batch_size
        self._max_payload = max_payload_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ota-ingest", daemon=True)
        self.stored = 0
        self.dropped: Counter[str] = Counter()
        # Receipt to commit of the oldest message in the last committed batch.
        self.lag_seconds = 0.0

    def backlog(self) -> int:
        """Messages received from the broker and not yet committed."""
        return self._link.inbox.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            if not batch:
                continue
            self._limited = self._over_limit(batch)
            delay = 0.1
            while not self._stop.is_set():
                try:
                    self._process(batch)
                    break
                except Unavailable as exc:
                    # Not acknowledged: retried here, and redelivered by the broker
                    # if this process dies meanwhile.
                    log.warning("ingest paused, database unavailable: %s", exc)
                    self._stop.wait(delay)
                    delay = min(delay * 2, 5.0)
                except Exception:
                    # Not the database being away: some message the store refuses.
                    # Find it alone, so one device cannot stall the whole fleet.
                    log.exception("ingest batch refused by the store; isolating the cause")
                    self._process_one_by_one(batch)
                    break

    def _process_one_by_one(self, batch: list[InboundMessage]) -> None:
        for message in batch:
            while not self._stop.is_set():
                try:
                    self._process([message])
                    break
                except Unavailable:
                    self._stop.wait(1.0)
                except Exception:
                    log.exception("dropping a message the store refuses: %s", message.topic)
                    with self._store.transaction() as session:
                        count_drops(session, Counter({"store_refused": 1}))
                    self._link.ack(message)
                    self.dropped["store_refused"] += 1
                    break

    def _over_limit(self, batch: list[InboundMessage]) -> set[int]:
        """Messages over their device's rate: decided once, not again when a batch is retried."""
        if self._limiter is None:
            return set()
        return {
            id(m)
            for m in batch
            if (parsed := self._link.topics.parse(m.topic)) and not self._limiter.admit(parsed[0])
        }

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

    def _process(self, batch: list[InboundMessage]) -> None:
        events: list[IncomingEvent] = []
        presence: list[ReportedPresence] = []
        dropped: Counter[str] = Counter()
        for message in batch:
            parsed = self._link.topics.parse(message.topic)
            try:
                if parsed is None:
                    raise Dropped("bad_topic", message.topic)
                device_id, kind = parsed
                if id(message) in self._limited:
                    dropped["rate_limited"] += 1  # logged by the limiter, once per interval
                    continue
                if kind == "events":
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
                    extra={"device_id": parsed[0] if parsed else None, "reason": drop.reason},
                )
        now = self._clock.now()
        with self._store.transaction() as session:
            result = ingest_events(session, events, now) if events else None
            if presence:
                fleet.mark_seen(session, _presence_rows(presence, now))
            count_drops(session, dropped)
        for message in batch:
            self._link.ack(message)
        self.lag_seconds = time.monotonic() - min(m.received for m in batch)
        if result is not None:
            self.stored += result.stored
            dropped.update(result.dropped)
            for reason, n in result.dropped.items():
                log.warning("dropped %d events: %s", n, reason)
        self.dropped.update(dropped)


def _presence_rows(
    presence: list[ReportedPresence], now: datetime
) -> list[tuple[str, datetime, bool | None]]:
    return [(p.device_id, now, p.online) for p in presence]
