"""The device's MQTT 5 session, on paho's own network thread.

One connection, so paho's threaded loop is the simplest thing that works: it
reconnects with backoff by itself, and QoS 1 messages published while the
connection is down wait in paho's queue and go out when it is back. Whatever
arrives is handed to the agent's single worker through callbacks; nothing here
decides anything.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ota.agent.config import TlsFiles

log = logging.getLogger(__name__)


class BrokerLink:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        device_id: str,
        secret: str,
        tls: TlsFiles | None,
        desired_topic: str,
        will: tuple[str, bytes],
        on_connected: Callable[[], None],
        on_desired: Callable[[bytes], None],
    ) -> None:
        self._host, self._port = host, port
        self._desired_topic = desired_topic
        self._on_connected = on_connected
        self._on_desired = on_desired
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
        if secret:
            client.username_pw_set(device_id, secret)
        # else a certificate device: the broker takes its name from the certificate.
        client.will_set(will[0], will[1], qos=1, retain=True)
        if tls is not None:
            client.tls_set(
                ca_certs=str(tls.ca_file) if tls.ca_file else None,
                certfile=str(tls.cert_file) if tls.cert_file else None,
                keyfile=str(tls.key_file) if tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_connect_fail = self._connect_failed
        client.on_message = self._message
        self._client = client
        self._last: mqtt.MQTTMessageInfo | None = None
        self._failing = False  # said once per outage, not at every retry
        self._accepted = False  # the broker accepted the session (CONNACK) since the last drop
        self._closed_said = False  # "closed before accepting it", once per outage

    def start(self) -> None:
        # connect_async: an unreachable broker is retried by the network thread, not fatal.
        self._client.connect_async(self._host, self._port, keepalive=60)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1; queued by paho while disconnected, so the caller never blocks on the network."""
        self._last = self._client.publish(topic, payload, qos=1, retain=retain)

    def stop(self, farewell: tuple[str, bytes] | None, timeout: float = 5.0) -> None:
        """Publish `farewell` (retained), wait a little for what is queued, disconnect."""
        try:
            if farewell is not None and self._client.is_connected():
                self.publish(farewell[0], farewell[1], retain=True)
            if self._last is not None and self._client.is_connected():
                self._last.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            log.info("could not flush before disconnecting: %s", exc)
        finally:
            self._client.disconnect()
            self._client.loop_stop()

    def _connected(
        self,
        client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        if getattr(reason, "is_failure", False):
            log.warning(
                "broker refused the connection: %s (check device_id and its secret or certificate)",
                reason,
            )
            return
        self._failing = False
        self._accepted = True
        self._closed_said = False
        log.info("connected to the broker at %s:%d", self._host, self._port)
        client.subscribe(self._desired_topic, qos=1)
        self._on_connected()

    def _connect_failed(self, _client: mqtt.Client, _userdata: object) -> None:
        if not self._failing:
            self._failing = True
            log.warning(
                "cannot reach the broker at %s:%d; retrying with backoff", self._host, self._port
            )

    def _disconnected(
        self,
        _client: mqtt.Client,
        _userdata: object,
        _flags: object,
        reason: object,
        _properties: object,
    ) -> None:
        if self._accepted:
            self._accepted = False
            log.info("disconnected from the broker (%s)", reason)
        elif not self._closed_said:
            # Closed before any CONNACK: what a broker does to a client certificate it
            # refuses (a revoked one, after the CRL) — paho only says "Unspecified error".
            self._closed_said = True
            log.warning(
                "the broker at %s:%d closed the connection before accepting it (%s): it "
                "refused the TLS handshake or this device's certificate (revoked, expired, "
                "of another CA?); retrying with backoff",
                self._host,
                self._port,
                reason,
            )
        else:
            log.debug("the broker closed the connection again before accepting it (%s)", reason)

    def _message(self, _client: mqtt.Client, _userdata: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._desired_topic and msg.payload:
            self._on_desired(bytes(msg.payload))
