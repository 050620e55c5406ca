"""MQTT sessions for thousands of simulated devices on one asyncio loop.

Each device has its own paho client, connection and credentials, but no
thread, queue or task of its own for the network: `LoopDriver` registers
every client's socket with the asyncio loop (paho's `on_socket_*`
callbacks), the loop calls `loop_read` / `loop_write` when a socket is ready,
and one timer calls `loop_misc` (keepalive) for all of them. paho's own loop
uses select(), which fails past about 1 000 sockets; a wrapper running paho's
blocking connect in a thread per client costs tasks, queues and thread hops
per device. This costs a few KiB per device (docs/PERFORMANCE.md,
fleet-connect).

`Connection` offers what a device needs: connect with a Last Will, subscribe,
publish at QoS 1 and wait for the PUBACK, and iterate over received messages.
Any loss of the connection raises `MqttError` from whatever waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import resource
import socket
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

# How often every client's keepalive is checked (paho pings when it is due).
TICK_SECONDS = 1.0
# Bytes taken from the kernel per read; paho itself asks for 1 byte, 1 byte, then the rest.
RECV_CHUNK = 16 * 1024


NO_MATCHING_SUBSCRIBERS = 0x10


class MqttError(Exception):
    """The connection was refused, lost or timed out."""


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes when the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class _DeviceClient(paho.Client):
    """paho with fewer system calls per packet, which is what a fleet's connect time is made of.

    Reads come from one buffer filled by one `recv` (paho reads a packet in
    three); a numeric broker address is connected without a name lookup.
    """

    _inbuf = b""
    _inpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._ssl:
            return super()._sock_recv(bufsize)  # TLS buffers on its own
        if self._inpos >= len(self._inbuf):
            if self._sock is None:
                raise ConnectionError("the socket is closed")
            self._inbuf = self._sock.recv(RECV_CHUNK)  # BlockingIOError when nothing is there
            self._inpos = 0
        chunk = self._inbuf[self._inpos : self._inpos + bufsize]
        self._inpos += len(chunk)
        return chunk

    @property
    def buffered(self) -> bool:
        """Bytes already read from the socket that paho has not consumed yet."""
        return self._inpos < len(self._inbuf)

    def _create_socket_connection(self) -> socket.socket:
        family = _numeric_family(self._host)
        if family is None or self._get_proxy() or self._bind_address:
            return super()._create_socket_connection()
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout)
            sock.connect((self._host, self._port))
        except BaseException:
            sock.close()
            raise
        return sock


@functools.lru_cache(maxsize=16)
def _numeric_family(host: str) -> socket.AddressFamily | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


class LoopDriver:
    """Hands paho clients' sockets to one asyncio loop and ticks their keepalives.

    A packet to send is written on the loop's next turn rather than after an
    epoll round trip; only a socket whose buffer is full waits for writability.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._clients: set[paho.Client] = set()
        self._tick: asyncio.TimerHandle | None = None

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._done_writing

    def _opened(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._loop.add_reader(sock, self._readable, client)
        self._clients.add(client)
        if self._tick is None:
            self._tick = self._loop.call_later(TICK_SECONDS, self._keepalive)

    def _closed(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._clients.discard(client)

    @staticmethod
    def _readable(client: paho.Client) -> None:
        client.loop_read()
        while isinstance(client, _DeviceClient) and client.buffered and client.socket():
            client.loop_read()

    def _want_write(self, client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._loop.call_soon(self._flush, client, sock)

    def _flush(self, client: paho.Client, sock: socket.socket) -> None:
        if client.socket() is not sock:
            return  # closed since
        client.loop_write()
        if client.want_write() and client.socket() is not None:
            self._loop.add_writer(sock.fileno(), client.loop_write)  # the rest once there is room

    def _done_writing(self, _client: paho.Client, _userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    def _keepalive(self) -> None:
        for client in list(self._clients):
            client.loop_misc()
        self._tick = self._loop.call_later(TICK_SECONDS, self._keepalive) if self._clients else None


_DRIVERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopDriver] = (
    weakref.WeakKeyDictionary()
)


def driver_for(loop: asyncio.AbstractEventLoop) -> LoopDriver:
    """The one driver of `loop`'s MQTT clients."""
    driver = _DRIVERS.get(loop)
    if driver is None:
        driver = _DRIVERS[loop] = LoopDriver(loop)
    return driver


class Connection:
    """One device's MQTT 5 session; use it as an async context manager.

    Entering connects (clean start) and waits for the CONNACK; leaving sends
    DISCONNECT, so the broker does not publish the Will. `connect_timeout`
    covers the TCP connect and the CONNACK.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str,
        password: str,
        client_id: str,
        will: Will | None = None,
        keepalive: int = 60,
        connect_timeout: float = 30.0,
        max_inflight: int = 20,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        client = _DeviceClient(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        if tls is not None:
            # Mutual TLS: the broker takes the username from the certificate.
            client.tls_set_context(tls)
        client.username_pw_set(username, password or None)
        client.max_inflight_messages_set(max_inflight)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._paho = client
        self._connack: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[bool]] = {}  # mid -> accepted
        self._inbox: deque[paho.MQTTMessage] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._lost: MqttError | None = None
        # Publishes the broker accepted but delivered to nobody (PUBACK 0x10).
        self._unrouted: set[int] = set()

    # --- the session ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        driver_for(loop).attach(self._paho)
        self._connack = loop.create_future()
        self._closed = loop.create_future()
        self._lost = None
        try:
            # A blocking TCP connect, immediate on a reachable host; the CONNECT packet
            # goes out when the loop finds the socket writable.
            rc = self._paho.connect(self.host, self.port, self.keepalive, clean_start=True)
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._drop()
            raise MqttError(f"cannot connect to {self.host}:{self.port}: {paho.error_string(rc)}")
        try:
            await asyncio.wait_for(asyncio.shield(self._connack), self.connect_timeout)
        except TimeoutError as exc:
            self._drop()
            raise MqttError(f"no CONNACK within {self.connect_timeout}s") from exc
        except BaseException:
            self._drop()
            raise

    async def disconnect(self, *, timeout: float = 5.0) -> None:
        """Leave cleanly (no Will); closes the socket if the broker does not answer in time."""
        closed = self._closed
        if self._paho.is_connected() and closed is not None and not closed.done():
            self._paho.disconnect()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), timeout)
        self._drop()

    def _drop(self) -> None:
        """Close the socket now, without DISCONNECT: the broker then publishes the Will."""
        sock = self._paho.socket()
        if sock is not None:
            self._paho._sock_close()  # paho has no public way to close without DISCONNECT
        self._lose(MqttError("connection closed"))

    # --- operations ----------------------------------------------------------------------

    async def subscribe(self, topic: str, *, qos: int = 1, retained: bool = True) -> bool:
        """Subscribe and wait for the SUBACK; False if the broker refused it.

        `retained=False` asks the broker not to send what is retained there now.
        """
        handling = (
            SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            if retained
            else SubscribeOptions.RETAIN_DO_NOT_SEND
        )
        rc, mid = self._paho.subscribe(
            topic, options=SubscribeOptions(qos=qos, retainHandling=handling)
        )
        self._check(rc)
        assert mid is not None
        return await self._ack(mid)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """Publish; at QoS 1, wait for the PUBACK. False if the broker refused it (MQTT 5)."""
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        self._check(info.rc)
        if qos == 0:
            return True
        return await self._ack(info.mid)

    async def publish_routed(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 1; False if the broker delivered it to nobody.

        MQTT 5 lets a broker answer with 0x10, "no matching subscribers":
        accepted, but nobody got it. Mosquitto 2.0 answers so for device events
        right after it restarts, because it routes nothing to a persistent
        session restored from its database (the control plane's ingest session)
        until that client reconnects. A refused publish counts as routed: sending
        it again would be refused again.
        """
        info = self._paho.publish(topic, payload, qos=1)
        self._check(info.rc)
        self._unrouted.discard(info.mid)  # message ids are reused
        await self._ack(info.mid)
        if info.mid in self._unrouted:
            self._unrouted.discard(info.mid)
            return False
        return True

    @property
    def messages(self) -> AsyncIterator[paho.MQTTMessage]:
        """Messages as they arrive; raises `MqttError` once the connection is gone."""
        return self._receive()

    async def _receive(self) -> AsyncIterator[paho.MQTTMessage]:
        loop = asyncio.get_running_loop()
        while True:
            while self._inbox:
                yield self._inbox.popleft()
            if self._lost is not None:
                raise self._lost
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _check(self, rc: MQTTErrorCode) -> None:
        if self._lost is not None:
            raise self._lost
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttError(paho.error_string(rc))

    async def _ack(self, mid: int) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._acks[mid] = future
        try:
            return await future
        finally:
            self._acks.pop(mid, None)

    # --- paho's callbacks (run by the loop inside loop_read / loop_write) ---------------

    def _on_connect(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if self._connack is None or self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(MqttError(f"connection refused: {reason}"))
        else:
            self._connack.set_result(None)

    def _on_disconnect(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._lose(MqttError(f"disconnected: {reason}"))

    def _lose(self, error: MqttError) -> None:
        if self._lost is None:
            self._lost = error
        connack = self._connack
        if connack is not None and not connack.done():
            connack.set_exception(error)
            connack.exception()  # seen, even when nobody awaits it any more
        for future in (self._closed, self._waiter):
            if future is not None and not future.done():
                future.set_result(None)
        for ack in list(self._acks.values()):
            if not ack.done():
                ack.set_exception(error)

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        self._resolve(mid, not any(r.is_failure for r in reasons))

    def _on_publish(
        self, _c: paho.Client, _u: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.value == NO_MATCHING_SUBSCRIBERS:
            self._unrouted.add(mid)
        self._resolve(mid, not reason.is_failure)

    def _resolve(self, mid: int, accepted: bool) -> None:
        ack = self._acks.get(mid)
        if ack is not None and not ack.done():
            ack.set_result(accepted)

    def _on_message(self, _c: paho.Client, _u: Any, message: paho.MQTTMessage) -> None:
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def raise_open_files_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; returns the limit now in force.

    Each device holds one socket. The soft limit goes up to the hard one, and
    the hard one too where the process may (root).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            pass
    new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return new_soft
