"""The control plane's one MQTT 5 session: publishes desired states, receives device messages.

One persistent session (clean start off, session expiry set) so events sent
while the control plane is down are queued by the broker and delivered on
reconnect. Messages are acknowledged manually, only after the database
commit that stores them (`ack`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ota.broker.config import publish_usernames
from ota.errors import InvalidArgument, Unavailable
from ota.transport.outbound import AckWindow, PublishingConnection
from ota.transport.topics import Topics

log = logging.getLogger(__name__)

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
# How long paho's network thread waits before looking again at a full inbox.
_FULL_INBOX_PAUSE = 0.01


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        tls = parts.scheme in ("mqtts", "ssl")
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not parts.hostname:
            raise InvalidArgument(
                f"{url!r} is not an mqtt://host:port or mqtts://host:port URL", field="mqtt_url"
            )
        return cls(parts.hostname, parts.port or (8883 if tls else 1883), tls)


class InboundMessage(NamedTuple):
    """A device message as paho handed it over (a tuple: built once per message, cheaply)."""

    topic: str
    payload: bytes
    mid: int
    qos: int
    # When it reached this process (monotonic): the start of its ingest lag.
    received: float


class MqttLink:
    """A paho client on its own network thread; inbound messages go to `inbox`."""

    def __init__(
        self,
        url: str,
        *,
        username: str,
        password: str,
        topics: Topics,
        inbox_size: int = 100_000,
        receive_maximum: int = 1000,
        ca_file: str = "",
        publish_connections: int = 1,
        ingest: bool = True,
    ) -> None:
        self._receive_maximum = receive_maximum
        # False when ingest worker processes hold the shared subscription instead.
        self._ingest = ingest
        self.address = BrokerAddress.parse(url)
        self.topics = topics
        # A SimpleQueue, in C: its put costs paho's network thread, which holds the GIL
        # for every message, a tenth of a Queue's. `_on_message` keeps the bound.
        self.inbox: queue.SimpleQueue[InboundMessage] = queue.SimpleQueue()
        self._inbox_size = inbox_size
        self.connected = threading.Event()
        # Set once the broker granted the ingest subscriptions (SUBACK).
        self.subscribed = threading.Event()
        # The first CONNACK, accepted or not: a refusal (bad credentials) is final at
        # start, not worth ten seconds of retries.
        self._answered = threading.Event()
        self._refusal = ""
        self._username = username
        # With use_username_as_clientid the broker names the session after the user.
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        self._client.username_pw_set(username, password)
        if self.address.tls:
            # Verifies the broker's certificate and host name; None = the system CAs.
            self._client.tls_set(ca_certs=ca_file or None)
        # The desired-state publisher keeps its own window (ota.transport.outbound):
        # paho's queue behind its in-flight limit costs a scan per PUBACK.
        self._client.max_inflight_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self.window = AckWindow()
        self._client.on_publish = self.window.on_publish
        self._client.on_subscribe = self._on_subscribe
        # Run (on a thread of its own) after every connect: the broker may have restarted.
        self.on_connected: Callable[[], None] | None = None
        # Desired states leave on this connection and on publish_connections - 1 more,
        # each with its own account and network thread (ota.transport.outbound).
        self._more = [
            PublishLink(self.address, username=name, password=password, ca_file=ca_file)
            for name in publish_usernames(username, publish_connections)
        ]
        self.publishing: list[PublishingConnection] = [self, *self._more]

    def start(self, timeout: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        # Events are acknowledged only after their batch is committed, so the
        # broker must let that many be in flight, or it trickles them out.
        props.ReceiveMaximum = self._receive_maximum
        try:
            self._client.connect(
                self.address.host,
                self.address.port,
                keepalive=30,
                clean_start=False,
                properties=props,
            )
        except OSError as exc:
            raise Unavailable(
                f"cannot reach the MQTT broker at {self.address.host}:{self.address.port}: {exc}"
            ) from exc
        self._client.loop_start()
        answered = self._answered.wait(timeout)
        if not self.connected.is_set():
            self.stop()
            where = f"the MQTT broker at {self.address.host}:{self.address.port}"
            if answered and self._refusal:
                raise Unavailable(
                    f"{where} refused the control plane's connection as "
                    f"{self._username!r}: {self._refusal} (check mqtt_username / mqtt_password)"
                )
            raise Unavailable(
                f"{where} did not accept the control plane's connection within {timeout:g} s "
                "(check mqtt_username / mqtt_password)"
            )
        try:
            for more in self._more:
                more.start(timeout)
        except Unavailable:
            self.stop()
            raise

    def stop(self, *, end_session: bool = False) -> None:
        """Disconnect; `end_session` also has the broker forget the session and its queue."""
        for more in self._more:
            more.stop()
        props = None
        if end_session:
            props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    @property
    def client(self) -> paho.Client:
        return self._client

    def publish_retained(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        return self._client.publish(topic, payload, qos=1, retain=True)

    def publish_control(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        """A message to the broker itself (QoS 1, not retained); paho resends it after a reconnect."""
        return self._client.publish(topic, payload, qos=1, retain=False)

    def stop_ingesting(self) -> None:
        """Leave the shared ingest subscription (ingest worker processes hold it now)."""
        self._ingest = False
        self._client.unsubscribe([self.topics.shared_events(), self.topics.shared_state()])

    def ack(self, message: InboundMessage) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: object,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the control plane: %s", reason)
            self._refusal = str(reason)
            self._answered.set()
            return
        shared = [self.topics.shared_events(), self.topics.shared_state()]
        if self._ingest:
            client.subscribe([(topic, 1) for topic in shared])
        else:
            # The persistent session may still hold them from a run that ingested
            # here: left in place, the broker would keep queueing this session a share.
            # What it queued already still arrives, and is ingested here.
            client.unsubscribe(shared)
        self.window.on_connect(props)
        self.connected.set()
        self._answered.set()
        log.info("connected to the broker at %s:%s", self.address.host, self.address.port)
        if self.on_connected is not None:
            threading.Thread(target=self.on_connected, name="ota-mqtt-resync", daemon=True).start()

    def _on_subscribe(
        self,
        _client: paho.Client,
        _userdata: object,
        _mid: int,
        reasons: list[ReasonCode],
        _props: Properties | None,
    ) -> None:
        refused = [r for r in reasons if r.is_failure]
        if refused:
            log.error("broker refused the ingest subscription: %s", refused[0])
        else:
            self.subscribed.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning("lost the broker (%s); paho reconnects", reason)

    def _on_message(self, _client: paho.Client, _userdata: object, msg: paho.MQTTMessage) -> None:
        # The ingester drains the inbox. Should it fall this far behind, paho's network
        # thread stops reading, and the broker holds the backlog.
        while self.inbox.qsize() >= self._inbox_size:
            time.sleep(_FULL_INBOX_PAUSE)
        self.inbox.put(
            InboundMessage(msg.topic, bytes(msg.payload), msg.mid, msg.qos, time.monotonic())
        )


class PublishLink:
    """One more connection that only publishes desired states (its own paho network thread).

    Its own account (`username`, the control plane's password), so its own
    session: the broker names a session after the username. A clean start: a
    desired state it did not get acknowledged stays in the outbox and is sent again.
    """

    def __init__(
        self, address: BrokerAddress, *, username: str, password: str, ca_file: str = ""
    ) -> None:
        self.address = address
        self.username = username
        self.connected = threading.Event()
        self.window = AckWindow()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5
        )
        self._client.username_pw_set(username, password)
        if address.tls:
            self._client.tls_set(ca_certs=ca_file or None)
        self._client.max_inflight_messages_set(0)  # the publisher keeps the window
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self.window.on_publish

    @property
    def client(self) -> paho.Client:
        return self._client

    def start(self, timeout: float = 10.0) -> None:
        try:
            self._client.connect(
                self.address.host, self.address.port, keepalive=30, clean_start=True
            )
        except OSError as exc:
            raise Unavailable(
                f"cannot reach the MQTT broker at {self.address.host}:{self.address.port}: {exc}"
            ) from exc
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            raise Unavailable(
                f"the MQTT broker did not accept the publishing connection {self.username!r} "
                "(each of publish_connections after the first needs this account, with the "
                "control plane's password; `ota broker-config --publish-connections` writes them)"
            )

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.ConnectFlags,
        reason: ReasonCode,
        props: Properties | None,
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the publishing connection %s: %s", self.username, reason)
            return
        self.window.on_connect(props)
        self.connected.set()

    def _on_disconnect(
        self,
        _client: paho.Client,
        _userdata: object,
        _flags: paho.DisconnectFlags,
        reason: ReasonCode,
        _props: Properties | None,
    ) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning(
                "publishing connection %s lost the broker (%s); paho reconnects",
                self.username,
                reason,
            )
