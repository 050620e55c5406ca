"""A real, private Mosquitto for tests, plus a small blocking MQTT 5 test client.

`private_broker(state_dir)` starts the configuration `ota.broker` generates
on a broker nobody else uses: in an ``eclipse-mosquitto`` container when a
Docker engine answers (testcontainers), otherwise as a child process of the
local ``mosquitto`` binary. Set ``OTA_TEST_BROKER=binary`` or ``=docker`` to
force one. Both run the same config, password file and ACL.

`MqttProbe` wraps one paho client; every wait is bounded and raises
AssertionError on timeout, so tests never sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from ota.broker import (
    BrokerFiles,
    BrokerSettings,
    MosquittoProcess,
    PasswordFile,
    generate_secret,
    start_private_broker,
    write_broker_config,
)

DEFAULT_TIMEOUT = 5.0
MOSQUITTO_IMAGE = os.environ.get("OTA_TEST_MOSQUITTO_IMAGE", "eclipse-mosquitto:2.0.11")


class _Runtime(Protocol):
    """Where the broker runs: a child process or a container."""

    host: str
    port: int

    def reload(self) -> None: ...
    def restart(self) -> None: ...
    def stop(self) -> None: ...


class _ProcessRuntime:
    def __init__(self, process: MosquittoProcess) -> None:
        self.process = process
        self.host = process.host
        self.port = process.port

    def reload(self) -> None:
        self.process.reload()

    def restart(self) -> None:
        self.process.restart()

    def stop(self) -> None:
        self.process.stop()


class _ContainerRuntime:
    """eclipse-mosquitto with the state directory mounted at the same path.

    Mounting it at the identical path keeps the config's absolute paths valid
    inside the container. A restart is a new container, so the port changes.
    The config loads the subscription guard built on the host, so the image
    must share the host's C library (OTA_TEST_MOSQUITTO_IMAGE).
    """

    def __init__(self, files: BrokerFiles) -> None:
        self.files = files
        self.host = ""
        self.port = 0
        self._container: Any = None
        self._start()

    def _start(self) -> None:
        from testcontainers.community.mqtt import MosquittoContainer

        state_dir = str(self.files.conf.parent)
        container = MosquittoContainer(MOSQUITTO_IMAGE)
        container.with_volume_mapping(state_dir, state_dir, "rw")
        container.start(configfile=str(self.files.conf))
        self._container = container
        self.host = container.get_container_host_ip()
        self.port = int(container.get_exposed_port(MosquittoContainer.MQTT_PORT))

    def _reload_count(self) -> int:
        stdout, stderr = self._container.get_logs()
        return int((stdout + stderr).count(b"Reloading config."))

    def reload(self) -> None:
        before = self._reload_count()
        self._container.get_wrapped_container().kill(signal="SIGHUP")
        wait_until(lambda: self._reload_count() > before, what="the container broker to reload")

    def restart(self) -> None:
        self.stop()
        self._start()

    def stop(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            # SIGTERM first, so Mosquitto saves its database; testcontainers'
            # own stop removes the container with SIGKILL.
            container.get_wrapped_container().stop(timeout=10)
            container.stop()


@functools.cache
def docker_available() -> bool:
    """True if a Docker engine answers within two seconds (checked once per run)."""
    forced = os.environ.get("OTA_TEST_BROKER", "").lower()
    if forced in ("binary", "docker"):
        return forced == "docker"
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://"):
        return _ping_unix_socket(host.removeprefix("unix://"))
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no daemon, bad URL: all mean "use the binary"
        return False


def _ping_unix_socket(path: str) -> bool:
    # A raw GET /_ping: cheap, and leaves no half-open client behind when
    # nothing listens (the SDK's failed connection leaks a socket).
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and b" 200" in status_line


@dataclasses.dataclass
class BrokerHandle:
    """A running private broker and what a test needs to use it."""

    settings: BrokerSettings
    files: BrokerFiles
    control_password: str
    process: MosquittoProcess | None  # None when the broker runs in a container
    _runtime: _Runtime

    @property
    def host(self) -> str:
        return self._runtime.host

    @property
    def port(self) -> int:
        return self._runtime.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def control_username(self) -> str:
        return self.settings.control_username

    @property
    def topic_root(self) -> str:
        return self.settings.topic_root

    @property
    def passwords(self) -> PasswordFile:
        return PasswordFile(self.files.password_file)

    def add_device(self, device_id: str) -> str:
        """Give `device_id` broker credentials, reload, and return its secret."""
        return self.add_devices([device_id])[device_id]

    def add_devices(self, device_ids: Iterable[str]) -> dict[str, str]:
        """Credentials for many devices with one file write and one reload."""
        secrets = {device_id: generate_secret() for device_id in device_ids}
        self.passwords.set_many(secrets)
        self.reload()
        return secrets

    def add_user(self, username: str) -> str:
        """Credentials for any user (an extra control-plane user, say); returns its secret."""
        return self.add_device(username)

    def revoke(self, username: str) -> None:
        """Remove a user's credentials and reload (its live connection is dropped)."""
        self.passwords.remove(username)
        self.reload()

    def reload(self) -> None:
        self._runtime.reload()

    def restart(self) -> None:
        """Stop and start the broker; persistence survives (the port may change in Docker)."""
        self._runtime.restart()

    def stop(self) -> None:
        self._runtime.stop()

    def client(self, username: str, password: str, **options: Any) -> MqttProbe:
        """An unconnected MqttProbe for this broker."""
        return MqttProbe(self.host, self.port, username, password, **options)

    def control_client(self, **options: Any) -> MqttProbe:
        return self.client(self.control_username, self.control_password, **options)


@contextlib.contextmanager
def private_broker(
    state_dir: Path, *, settings: BrokerSettings | None = None
) -> Iterator[BrokerHandle]:
    """A private broker with the project's generated config, stopped on exit.

    `settings` default to `BrokerSettings` on a free port; files go under
    ``state_dir/broker``.
    """
    settings = settings or BrokerSettings(port=0)
    control_password = generate_secret()
    broker_dir = Path(state_dir) / "broker"
    runtime: _Runtime
    if docker_available():
        # Inside the container: listen on all interfaces of its own network
        # namespace, stay root (the files belong to the host user) and log to
        # stdout, where testcontainers watches for readiness.
        settings = dataclasses.replace(
            settings, port=1883, bind_address="0.0.0.0", run_as_user="root", log_to_stdout=True
        )
        files = write_broker_config(broker_dir, settings, control_password=control_password)
        runtime = _ContainerRuntime(files)
        process = None
    else:
        process, files = start_private_broker(
            broker_dir, control_password=control_password, settings=settings
        )
        settings = dataclasses.replace(settings, port=process.port)
        runtime = _ProcessRuntime(process)
    handle = BrokerHandle(settings, files, control_password, process, runtime)
    try:
        yield handle
    finally:
        handle.stop()


def wait_until(
    condition: Callable[[], bool], *, timeout: float = DEFAULT_TIMEOUT, what: str
) -> None:
    """Poll `condition` with backoff until true; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def session_properties(expiry_s: int) -> Properties:
    """CONNECT properties asking the broker to keep the session `expiry_s` after disconnect."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    return props


class MqttProbe:
    """One paho MQTT 5 client with blocking, bounded helpers for tests.

    Received messages queue up in `messages`; PUBACK and SUBACK reason codes
    are kept by message id, since paho may report them before `publish`
    returns. Use as a context manager so the network thread always stops.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        password: str,
        *,
        clean_start: bool = True,
        session_expiry_s: int | None = None,
        will: tuple[str, bytes, bool] | None = None,
        keepalive: int = 30,
        protocol: int = mqtt.MQTTv5,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.keepalive = keepalive
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.connected = threading.Event()
        self.connack_received = threading.Event()
        self.disconnected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._acks_cond = threading.Condition()
        self._loop_started = False

        # use_username_as_clientid makes the broker replace the client id anyway.
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.client = client

    # paho callbacks, on its network thread

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self.connack = reason
        self.session_present = bool(flags.session_present)
        if not reason.is_failure:
            self.disconnected.clear()
            self.connected.set()
        self.connack_received.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self.disconnect_reason = reason
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._acks_cond:
            self._acks[mid] = reason
            self._acks_cond.notify_all()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any
    ) -> None:
        with self._acks_cond:
            self._acks[mid] = reasons
            self._acks_cond.notify_all()

    # blocking helpers

    def connect(self, *, timeout: float = DEFAULT_TIMEOUT) -> ReasonCode:
        """Connect and wait for CONNACK; returns its reason code (success or refusal)."""
        self.connack_received.clear()
        self._stop_loop()  # a reconnect needs a fresh network thread
        properties = (
            session_properties(self.session_expiry_s) if self.session_expiry_s is not None else None
        )
        v5 = self.client.protocol == mqtt.MQTTv5
        self.client.connect(
            self.host,
            self.port,
            keepalive=self.keepalive,
            # MQTT 3.1.1 has clean session instead, set when the client is made.
            clean_start=self.clean_start if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.loop_start()
        self._loop_started = True
        if not self.connack_received.wait(timeout):
            raise AssertionError(f"{self.username}: no CONNACK within {timeout}s")
        assert self.connack is not None
        return self.connack

    def connect_ok(self, *, timeout: float = DEFAULT_TIMEOUT) -> Self:
        reason = self.connect(timeout=timeout)
        assert not reason.is_failure, f"{self.username}: connection refused: {reason}"
        return self

    def _wait_ack(self, mid: int | None, timeout: float, what: str) -> Any:
        assert mid is not None, f"{self.username}: {what} was not sent"
        with self._acks_cond:
            if not self._acks_cond.wait_for(lambda: mid in self._acks, timeout):
                raise AssertionError(f"{self.username}: no {what} ack within {timeout}s")
            return self._acks.pop(mid)

    def subscribe(
        self, topic: str, *, qos: int = 1, timeout: float = DEFAULT_TIMEOUT
    ) -> ReasonCode:
        """Subscribe and return the SUBACK reason code (a granted QoS or a refusal)."""
        _rc, mid = self.client.subscribe(topic, qos=qos)
        reasons: list[ReasonCode] = self._wait_ack(mid, timeout, f"SUBACK for {topic}")
        return reasons[0]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> ReasonCode:
        """Publish and, for QoS 1, wait for the PUBACK; returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return ReasonCode(PacketTypes.PUBACK, "Success")
        reason: ReasonCode = self._wait_ack(info.mid, timeout, f"PUBACK for {topic}")
        return reason

    def next_message(self, *, timeout: float = DEFAULT_TIMEOUT) -> mqtt.MQTTMessage:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.username}: no message within {timeout}s") from None

    def messages_until(
        self, marker_topic: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> list[mqtt.MQTTMessage]:
        """Every message up to and including the first on `marker_topic`.

        A marker published after a message that must not arrive proves its
        absence without sleeping: the broker delivers in order, so anything
        sent earlier would already be in this list.
        """
        deadline = time.monotonic() + timeout
        seen: list[mqtt.MQTTMessage] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                topics = [m.topic for m in seen]
                raise AssertionError(
                    f"{self.username}: no message on {marker_topic} within {timeout}s "
                    f"(got {topics})"
                )
            message = self.next_message(timeout=remaining)
            seen.append(message)
            if message.topic == marker_topic:
                return seen

    def disconnect(self, *, with_will: bool = False, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send DISCONNECT (reason 0x04 asks the broker to publish the Will) and wait."""
        if not self.connected.is_set():
            return
        reason = ReasonCode(
            PacketTypes.DISCONNECT,
            "Disconnect with will message" if with_will else "Normal disconnection",
        )
        self.client.disconnect(reasoncode=reason)
        if not self.disconnected.wait(timeout):
            raise AssertionError(f"{self.username}: not disconnected within {timeout}s")
        self._stop_loop()

    def _stop_loop(self) -> None:
        if self._loop_started:
            self.client.loop_stop()
            self._loop_started = False

    def close(self) -> None:
        """Disconnect if connected and stop the network thread."""
        with contextlib.suppress(AssertionError):
            self.disconnect(timeout=2.0)
        # Also stops paho from retrying a refused connection.
        self.client.disconnect()
        self._stop_loop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = [
    "BrokerHandle",
    "MqttProbe",
    "docker_available",
    "private_broker",
    "session_properties",
    "wait_until",
]
