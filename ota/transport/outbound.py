"""Desired states out over one or more MQTT connections, each device always on the same one.

Why the publisher does its own flow control instead of paho's: paho queues a
publish beyond its in-flight limit and, on every PUBACK, scans its whole
message table for the next queued one, which costs more than the publish
itself once thousands are queued (a single connection: about 4 000
acknowledged publishes a second that way against 12 000 with nothing queued
in paho, docs/PERFORMANCE.md). So paho's own limit is off on publishing
connections, and `Shard` keeps at most the broker's Receive Maximum of
publishes unacknowledged on each connection, as MQTT 5 requires; it hands
paho only what may be sent now.

A device is published on the connection its id hashes to, so a newer retained
state can never overtake an older one for one device: a connection is one
ordered stream, and paho resends what was in flight in order after a
reconnect.
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ota.transport.topics import Topics

# MQTT 5: a CONNACK without Receive Maximum means 65 535. A larger window than
# this only queues bytes in the socket without moving acknowledgements sooner.
WINDOW_CAP = 1000


class AckWindow:
    """One connection's acknowledgements, appended by paho's network thread.

    The network thread only appends (a deque is safe for one appender and one
    taker) and wakes the publisher once enough acknowledgements are in to be
    worth a round, not on every one.
    """

    def __init__(self) -> None:
        self.size = 100
        self.acks: deque[tuple[int, int]] = deque()
        # 0 while the publisher is not waiting for this connection.
        self.wake_at = 0
        # Shared by every connection of one publisher (`Shards` sets it).
        self.wake = threading.Condition()

    def on_connect(self, props: Properties | None) -> None:
        receive_maximum = getattr(props, "ReceiveMaximum", None) if props is not None else None
        self.size = max(1, min(int(receive_maximum or 65_535), WINDOW_CAP))

    def on_publish(
        self,
        _client: paho.Client,
        _userdata: object,
        mid: int,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self.acks.append((mid, reason.value))
        if self.wake_at and len(self.acks) >= self.wake_at:
            with self.wake:
                self.wake.notify_all()


class PublishingConnection(Protocol):
    """What `Shard` needs of a connection: its client, its state, its window."""

    @property
    def client(self) -> paho.Client: ...
    @property
    def connected(self) -> threading.Event: ...
    @property
    def window(self) -> AckWindow: ...


@dataclass(frozen=True)
class Outcome:
    """What came back for one desired state."""

    device_id: str
    generation: int
    reason: int  # the PUBACK's reason code; >= 0x80 is a refusal

    @property
    def accepted(self) -> bool:
        return self.reason < 0x80


@dataclass
class Shard:
    """The devices hashed to one connection: a queue, and what is in flight on it."""

    link: PublishingConnection
    topics: Topics
    queued: deque[tuple[str, int, bytes]] = field(default_factory=deque)
    # paho's message id -> the desired state it carries.
    in_flight: dict[int, tuple[str, int]] = field(default_factory=dict)

    def settle(self, out: list[Outcome]) -> None:
        """Move what the broker acknowledged from `in_flight` to `out`."""
        acks = self.link.window.acks
        while acks:
            mid, reason = acks.popleft()
            sent = self.in_flight.pop(mid, None)
            if sent is not None:  # else: given up on before its late ack, or not ours
                out.append(Outcome(sent[0], sent[1], reason))

    def send(self) -> int:
        """Hand paho as many queued states as the window has room for; how many."""
        room = self.link.window.size - len(self.in_flight)
        sent = 0
        client, desired = self.link.client, self.topics.desired
        while room > 0 and self.queued:
            device_id, generation, envelope = self.queued.popleft()
            info = client.publish(desired(device_id), envelope, qos=1, retain=True)
            # NO_CONN: paho holds it and sends it, in order, after the reconnect.
            if info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                self.in_flight[info.mid] = (device_id, generation)
                room -= 1
                sent += 1
            # Otherwise paho refused it (its message ids ran into one still held):
            # left unpublished in the outbox, the next pass sends it again.
        return sent


class Shards:
    """Desired states spread over connections by device id, sent within each window."""

    def __init__(self, links: Sequence[PublishingConnection], topics: Topics) -> None:
        if not links:
            raise ValueError("publishing needs at least one connection")
        self.shards = [Shard(link, topics) for link in links]
        self.wake = threading.Condition()
        for link in links:
            link.window.wake = self.wake

    def shard_of(self, device_id: str) -> Shard:
        # crc32, not hash(): the same device on the same connection in every run.
        return self.shards[zlib.crc32(device_id.encode()) % len(self.shards)]

    def enqueue(self, device_id: str, generation: int, envelope: bytes) -> None:
        self.shard_of(device_id).queued.append((device_id, generation, envelope))

    @property
    def queued(self) -> int:
        return sum(len(s.queued) for s in self.shards)

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.shards)

    def all_connected(self) -> bool:
        return all(s.link.connected.is_set() for s in self.shards)

    def pump(self) -> tuple[int, list[Outcome]]:
        """Collect acknowledgements and send into the room they made: (sent, outcomes)."""
        outcomes: list[Outcome] = []
        sent = 0
        for shard in self.shards:
            shard.settle(outcomes)
            sent += shard.send()
        return sent, outcomes

    def wait(self, timeout: float) -> None:
        """Sleep until some connection has half a window of acknowledgements, or timeout."""
        wake = self.wake
        with wake:
            try:
                # Asked for first, then looked at: an acknowledgement that arrives in
                # between is either seen here or wakes the wait.
                for shard in self.shards:
                    shard.link.window.wake_at = max(1, len(shard.in_flight) // 2)
                if not any(len(s.link.window.acks) >= s.link.window.wake_at for s in self.shards):
                    wake.wait(timeout)
            finally:
                for shard in self.shards:
                    shard.link.window.wake_at = 0

    def abandon(self) -> int:
        """Forget what is queued or unacknowledged (the outbox still holds it); how many."""
        dropped = 0
        for shard in self.shards:
            dropped += len(shard.queued) + len(shard.in_flight)
            shard.queued.clear()
            shard.in_flight.clear()
        return dropped
