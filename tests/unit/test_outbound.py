"""Shards: a device always on one connection, at most a window in flight, refusals kept apart."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ota.transport.outbound import AckWindow, Shards
from ota.transport.topics import Topics


@dataclass
class _Info:
    mid: int
    rc: MQTTErrorCode = MQTTErrorCode.MQTT_ERR_SUCCESS


@dataclass
class _Client:
    sent: list[tuple[int, str, bytes]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> _Info:
        assert qos == 1 and retain
        mid = len(self.sent) + 1
        self.sent.append((mid, topic, payload))
        return _Info(mid)


class _Link:
    def __init__(self, receive_maximum: int) -> None:
        self.client = _Client()
        self.connected = threading.Event()
        self.connected.set()
        self.window = AckWindow()
        props = Properties(PacketTypes.CONNACK)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = receive_maximum
        self.window.on_connect(props)

    def ack(self, mid: int, reason: str = "Success") -> None:
        self.window.on_publish(None, None, mid, ReasonCode(PacketTypes.PUBACK, reason), None)  # type: ignore[arg-type]


def test_a_device_is_always_sent_on_the_same_connection_and_every_connection_gets_a_share() -> None:
    links = [_Link(1000) for _ in range(3)]
    shards = Shards(links, Topics())
    devices = [f"car-{i}" for i in range(300)]
    for generation in (1, 2):
        for d in devices:
            shards.enqueue(d, generation, f"{d}:{generation}".encode())
        shards.pump()
    carried = {i: {t.split("/")[3] for _, t, _ in link.client.sent} for i, link in enumerate(links)}
    assert all(carried.values())
    assert sum(len(c) for c in carried.values()) == len(devices)  # no device on two
    for link in links:
        per_device: dict[str, list[bytes]] = {}
        for _, topic, payload in link.client.sent:
            per_device.setdefault(topic, []).append(payload)
        assert all(len(p) == 2 and p[0].endswith(b":1") for p in per_device.values())


def test_no_more_than_the_brokers_receive_maximum_is_in_flight_on_a_connection() -> None:
    link = _Link(receive_maximum=10)
    shards = Shards([link], Topics())
    for i in range(25):
        shards.enqueue(f"car-{i}", 1, b"x")
    sent, _ = shards.pump()
    assert sent == 10 and len(link.client.sent) == 10
    for mid in range(1, 5):
        link.ack(mid)
    sent, outcomes = shards.pump()
    assert [o.device_id for o in outcomes] == ["car-0", "car-1", "car-2", "car-3"]
    assert sent == 4 and shards.in_flight == 10 and shards.queued == 11


def test_a_refused_publish_is_reported_as_not_accepted() -> None:
    link = _Link(receive_maximum=10)
    shards = Shards([link], Topics())
    shards.enqueue("car-1", 3, b"x")
    shards.enqueue("car-2", 4, b"y")
    shards.pump()
    link.ack(1, "Not authorized")
    link.ack(2, "No matching subscribers")
    _, outcomes = shards.pump()
    assert [(o.device_id, o.generation, o.accepted) for o in outcomes] == [
        ("car-1", 3, False),
        ("car-2", 4, True),
    ]
    assert shards.in_flight == 0


def test_a_waiting_publisher_is_woken_by_acknowledgements() -> None:
    link = _Link(receive_maximum=4)
    shards = Shards([link], Topics())
    for i in range(4):
        shards.enqueue(f"car-{i}", 1, b"x")
    shards.pump()
    woke = threading.Event()

    def wait() -> None:
        shards.wait(timeout=60)
        woke.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    link.ack(1)
    link.ack(2)  # half the window in: worth a round
    assert woke.wait(timeout=30)
    waiter.join(timeout=30)
