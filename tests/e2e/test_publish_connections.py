"""Desired states over several publishing connections, on the private broker and a real database.

The publisher's outbox is written the way the engine writes it (signed
envelopes stand in as "device:generation" text, which the publisher never
reads), and a control-plane subscriber records every desired-state message
in the order the broker delivers it.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from sqlmodel import select

from ota.broker.config import BrokerSettings
from ota.store import desired
from ota.store.database import connect, migrate
from ota.store.models import DesiredStateRow
from ota.store.session import Store
from ota.transport.mqtt import MqttLink
from ota.transport.publisher import DesiredStatePublisher
from ota.transport.topics import Topics
from tests.broker_harness import BrokerHandle, MqttProbe, private_broker, wait_until

CONNECTIONS = 3
# Not the control plane's own account: a username is a session, one connection at a time.
WATCHER = "ota-watcher"
DEVICES = [f"car-{i:04d}" for i in range(600)]
TIMEOUT = 120.0


@pytest.fixture
def broker3(tmp_path: Path) -> Iterator[BrokerHandle]:
    settings = BrokerSettings(
        port=0, publish_connections=CONNECTIONS, extra_control_usernames=(WATCHER,)
    )
    with private_broker(tmp_path / "broker", settings=settings) as handle:
        yield handle


def _watcher(broker: BrokerHandle) -> MqttProbe:
    return broker.client(WATCHER, broker.add_user(WATCHER))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = connect(f"sqlite:///{tmp_path / 'ota.db'}")
    migrate(engine)
    return Store(engine)


class Recorder:
    """Every desired state the broker delivers, per device, in delivery order."""

    def __init__(self, probe: MqttProbe) -> None:
        self.seen: dict[str, list[int]] = defaultdict(list)
        self._lock = threading.Lock()
        probe.client.on_message = self._on_message

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device_id, generation = message.payload.decode().split(":")
        with self._lock:
            self.seen[device_id].append(int(generation))

    def latest(self) -> dict[str, int]:
        with self._lock:
            return {d: g[-1] for d, g in self.seen.items()}

    def sequences(self) -> dict[str, list[int]]:
        with self._lock:
            return {d: list(g) for d, g in self.seen.items()}


def _issue(store: Store, generation: int) -> None:
    envelopes = {d: (generation, f"{d}:{generation}".encode()) for d in DEVICES}
    with store.transaction() as session:
        desired.save_envelopes(session, envelopes, datetime.now(UTC))


def _unpublished(store: Store) -> int:
    with store.transaction() as session:
        rows = session.exec(select(DesiredStateRow)).all()
        return sum(1 for r in rows if r.published_generation != r.generation)


def _link(broker: BrokerHandle) -> MqttLink:
    return MqttLink(
        f"mqtt://{broker.host}:{broker.port}",
        username=broker.control_username,
        password=broker.control_password,
        topics=Topics(broker.topic_root),
        publish_connections=CONNECTIONS,
    )


def _retained(broker: BrokerHandle) -> dict[str, int]:
    """What a device connecting now would be handed: every retained desired state."""
    with _watcher(broker) as late:
        late.connect_ok()
        recorder = Recorder(late)
        late.subscribe(Topics(broker.topic_root).desired("+"))
        wait_until(
            lambda: len(recorder.latest()) == len(DEVICES),
            timeout=TIMEOUT,
            what="every retained desired state",
        )
        return recorder.latest()


def test_rapid_generations_over_several_connections_end_at_the_latest_for_every_device(
    broker3: BrokerHandle, store: Store
) -> None:
    with _watcher(broker3) as watcher:
        watcher.connect_ok()
        recorder = Recorder(watcher)
        watcher.subscribe(Topics(broker3.topic_root).desired("+"))
        link = _link(broker3)
        link.start()
        publisher = DesiredStatePublisher(link, store, poll_seconds=0.2)
        publisher.start()
        try:
            # Generations issued faster than they are published: a pass is often
            # still sending one while the next is committed.
            for generation in range(1, 6):
                _issue(store, generation)
                publisher.wake()
            wait_until(
                lambda: recorder.latest() == dict.fromkeys(DEVICES, 5),
                timeout=TIMEOUT,
                what="every device's fifth generation delivered",
            )
            wait_until(lambda: _unpublished(store) == 0, timeout=TIMEOUT, what="the outbox empty")
        finally:
            publisher.stop()
            link.stop()
    # Never an older state after a newer one, for any device.
    for device_id, generations in recorder.sequences().items():
        assert generations == sorted(generations), (device_id, generations)
    assert _retained(broker3) == dict.fromkeys(DEVICES, 5)
    log = broker3.files.log_file.read_text()
    for n in range(2, CONNECTIONS + 1):
        assert f"as {broker3.control_username}-publish-{n}" in log


def test_a_broker_restart_mid_publish_leaves_nothing_unpublished(
    broker3: BrokerHandle, store: Store
) -> None:
    if broker3.process is None:
        pytest.skip("a restarted container listens on another port")
    link = _link(broker3)
    link.start()
    publisher = DesiredStatePublisher(link, store, poll_seconds=0.2)
    try:
        _issue(store, 1)
        publisher.start()
        wait_until(lambda: publisher.published > 0, timeout=TIMEOUT, what="the first states out")
        broker3.restart()  # persistence kept: what was acknowledged stays retained
        _issue(store, 2)  # and a newer generation while the connections come back
        publisher.wake()
        wait_until(lambda: _unpublished(store) == 0, timeout=TIMEOUT, what="the outbox empty")
    finally:
        publisher.stop()
        link.stop()
    assert _retained(broker3) == dict.fromkeys(DEVICES, 2)


def test_a_publishing_account_may_publish_desired_states_and_nothing_else(
    broker3: BrokerHandle,
) -> None:
    topics = Topics(broker3.topic_root)
    name = f"{broker3.control_username}-publish-2"
    with broker3.client(name, broker3.control_password) as publishing:
        publishing.connect_ok()
        assert not publishing.publish(topics.desired("car-0001"), b"x", retain=True).is_failure
        assert publishing.publish(topics.events("car-0001"), b"x").is_failure
        # The subscription guard treats it as any non-control user: its own desired topic only.
        assert publishing.subscribe(topics.desired("car-0001")).is_failure
        assert publishing.subscribe(topics.shared_events()).is_failure
