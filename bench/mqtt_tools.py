"""MQTT helpers for benchmarks: device publishers, a counting subscriber, device receivers.

Device-side clients are paho clients driven from one asyncio loop: the
simulator's own `device_sim.mqtt` for the notify baseline, aiomqtt for the
publishers. paho's own loop uses select() and breaks past about 1 000 sockets. The counting subscriber is one plain paho client on its own
network thread, like the control plane's link.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import subprocess
import sys
import threading
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from google.protobuf.timestamp_pb2 import Timestamp
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from device_sim.mqtt import Connection, raise_open_files_limit
from ota.transport.topics import Topics
from ota.v1 import common_pb2

CONNECTS_AT_ONCE = 64
# aiomqtt warns about every publish waiting for its PUBACK: expected here, by design.
_QUIET = logging.getLogger("bench.mqtt")
_QUIET.setLevel(logging.ERROR)
LIFECYCLE = ["NOTIFIED", "DOWNLOADING", "DOWNLOADED", "VERIFIED", "INSTALLING", "INSTALLED"]


def device_events(
    device_id: str,
    count: int,
    *,
    rollout_id: str = "",
    feature: str = "",
    version: str = "",
    sha256: bytes = b"",
    first_seq: int = 1,
) -> list[bytes]:
    """`count` valid DeviceEvents from `first_seq` on: the install lifecycle, then ACTIVE
    with health samples."""
    now = Timestamp()
    now.GetCurrentTime()
    out = []
    for seq in range(first_seq, first_seq + count):
        state = LIFECYCLE[seq - 1] if seq <= len(LIFECYCLE) else "ACTIVE"
        event = common_pb2.DeviceEvent(
            device_id=device_id,
            seq=seq,
            rollout_id=rollout_id,
            bundle_sha256=sha256,
            state=common_pb2.DeviceState.Value(state),
            time=now,
            feature=feature,
            version=version,
        )
        if state == "ACTIVE" and seq > len(LIFECYCLE) + 1:
            event.health.uptime_seconds = 60 * seq
        out.append(event.SerializeToString())
    return out


def publish_events(
    host: str,
    port: int,
    accounts: dict[str, str],
    payloads: dict[str, list[bytes]],
    topics: Topics,
) -> tuple[float, float]:
    """Each device connects with its own credentials and publishes its events at QoS 1.

    Returns (connect seconds, publish seconds); publishing ends when every
    PUBACK is in. Per device, events go out in order.
    """
    return asyncio.run(_publish(host, port, accounts, payloads, topics))


async def _publish(
    host: str,
    port: int,
    accounts: dict[str, str],
    payloads: dict[str, list[bytes]],
    topics: Topics,
) -> tuple[float, float]:
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, aiomqtt.Client] = {}

        async def connect(device_id: str) -> None:
            client = aiomqtt.Client(
                host,
                port,
                username=device_id,
                password=accounts[device_id],
                identifier=device_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                logger=_QUIET,
                max_inflight_messages=100,
                timeout=120,
            )
            async with gate:
                clients[device_id] = await stack.enter_async_context(client)

        t0 = time.perf_counter()
        await asyncio.gather(*(connect(d) for d in payloads))
        t1 = time.perf_counter()

        async def send(device_id: str) -> None:
            client, topic = clients[device_id], topics.events(device_id)
            await asyncio.gather(
                *(client.publish(topic, p, qos=1, timeout=math.inf) for p in payloads[device_id])
            )

        await asyncio.gather(*(send(d) for d in payloads))
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


class CountingSubscriber:
    """A paho subscriber on a persistent session that only counts messages.

    `prepare` creates the session and its subscription and goes offline, so
    the broker queues what is published next; `drain` reconnects and returns
    (seconds from connect to the last expected message, count).
    """

    def __init__(self, host: str, port: int, username: str, password: str, topic: str) -> None:
        self.host, self.port, self.topic = host, port, topic
        self.username, self.password = username, password
        self.count = 0
        self._expected = 0
        self._done = threading.Event()
        self._subscribed = threading.Event()
        self._connected = threading.Event()

    def _client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.username, protocol=paho.MQTTv5
        )
        client.username_pw_set(self.username, self.password)
        client.on_connect = lambda *_: self._connected.set()
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        return client

    def _on_message(self, _c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        self.count += 1
        if self.count >= self._expected:
            self._done.set()

    def _connect(self, client: paho.Client, *, clean_start: bool) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._connected.clear()
        client.connect(
            self.host, self.port, keepalive=60, clean_start=clean_start, properties=props
        )
        client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("the counting subscriber could not connect")

    def prepare(self) -> None:
        client = self._client()
        self._connect(client, clean_start=True)
        self._subscribed.clear()
        client.subscribe(self.topic, options=SubscribeOptions(qos=1))
        if not self._subscribed.wait(10):
            raise TimeoutError("the counting subscriber's subscription was not acknowledged")
        client.disconnect()
        client.loop_stop()

    def drain(self, expected: int, *, timeout: float) -> tuple[float, int]:
        self.count, self._expected = 0, expected
        self._done.clear()
        client = self._client()
        t0 = time.perf_counter()
        self._connect(client, clean_start=False)
        finished = self._done.wait(timeout)
        elapsed = time.perf_counter() - t0
        # Leave no session behind that would keep queuing later messages.
        client.unsubscribe(self.topic)
        props = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        client.disconnect(properties=props)
        client.loop_stop()
        if not finished:
            raise TimeoutError(f"the counting subscriber got {self.count} of {expected} messages")
        return elapsed, self.count


def broadcast_baseline(
    host: str,
    port: int,
    accounts: dict[str, str],
    publisher: tuple[str, str],
    topics: Topics,
    *,
    timeout: float,
) -> dict[str, float]:
    """The notify baseline: one retained publish to each device's desired topic.

    Every device connects with its own credentials and subscribes to its own
    `desired` topic (without the retained copy already there); then one
    control-plane-side client publishes a small retained message to each
    topic. Measures first publish to last delivery. The ACL gives each device
    only its own topic, so a single shared broadcast topic is not possible.
    """
    raise_open_files_limit(len(accounts) + 512)
    return asyncio.run(_broadcast(host, port, accounts, publisher, topics, timeout=timeout))


async def _broadcast(
    host: str,
    port: int,
    accounts: dict[str, str],
    publisher: tuple[str, str],
    topics: Topics,
    *,
    timeout: float,
) -> dict[str, float]:
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    received = 0
    all_in = asyncio.Event()
    payload = b"\x00" * 200  # about the size of a signed desired state envelope
    clients: list[Connection] = []

    async def connect(device_id: str) -> None:
        client = Connection(
            host, port, username=device_id, password=accounts[device_id], client_id=device_id
        )
        async with gate:
            await client.connect()
            clients.append(client)
            await client.subscribe(topics.desired(device_id), retained=False)

    async def listen(client: Connection) -> None:
        nonlocal received
        async for _message in client.messages:
            received += 1
            if received == len(accounts):
                all_in.set()
            return

    pub = Connection(
        host,
        port,
        username=publisher[0],
        password=publisher[1],
        client_id=publisher[0],
        max_inflight=1000,
    )
    listeners: list[asyncio.Task[None]] = []
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(connect(d) for d in accounts))
        connect_s = time.perf_counter() - t0
        listeners = [asyncio.create_task(listen(c)) for c in clients]
        await pub.connect()
        t1 = time.perf_counter()
        await asyncio.gather(
            *(pub.publish(topics.desired(d), payload, qos=1, retain=True) for d in accounts)
        )
        await asyncio.wait_for(all_in.wait(), timeout)
        delivered_s = time.perf_counter() - t1
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await asyncio.gather(*(c.disconnect() for c in [*clients, pub]), return_exceptions=True)
    return {"connect_s": connect_s, "notify_s": delivered_s}


# --- the notify baseline with its receivers in child processes ------------------------


def broadcast_baseline_in_processes(
    host: str,
    port: int,
    accounts: dict[str, str],
    publisher: tuple[str, str],
    topics: Topics,
    *,
    timeout: float,
    processes: int = 2,
) -> dict[str, float]:
    """`broadcast_baseline` with the receiving devices split over `processes` children.

    The layout of the fleet it is compared with: the devices in child processes,
    the publisher (the control plane's side) in this one. Every process reads
    the same wall clock, so delivery is first publish to the last child's last
    message.
    """
    ids = sorted(accounts)
    shares = [ids[i::processes] for i in range(processes)]
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bench.mqtt_tools"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in shares
    ]
    try:
        for child, share in zip(children, shares, strict=True):
            assert child.stdin is not None
            spec = {
                "host": host,
                "port": port,
                "accounts": {d: accounts[d] for d in share},
                "topic_root": topics.root,
                "timeout": timeout,
            }
            child.stdin.write(json.dumps(spec) + "\n")
            child.stdin.close()
        ready = [_line(child) for child in children]
        t0 = asyncio.run(_publish_each(host, port, publisher, topics, ids))
        done = [_line(child) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
    if sum(int(d["received"]) for d in done) != len(ids):
        raise RuntimeError(f"the baseline's receivers got {done}, not {len(ids)} messages")
    return {
        "connect_s": max(float(r["connect_s"]) for r in ready),
        "notify_s": max(float(d["last_at"]) for d in done) - t0,
        "processes": float(processes),
    }


def _line(child: subprocess.Popen[str]) -> dict[str, Any]:
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        raise RuntimeError(f"a baseline receiver exited with {child.wait(timeout=10)}")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def _publish_each(
    host: str, port: int, publisher: tuple[str, str], topics: Topics, ids: list[str]
) -> float:
    payload = b"\x00" * 200  # about the size of a signed desired state envelope
    pub = Connection(
        host,
        port,
        username=publisher[0],
        password=publisher[1],
        client_id=publisher[0],
        max_inflight=1000,
    )
    await pub.connect()
    try:
        t0 = time.time()
        await asyncio.gather(
            *(pub.publish(topics.desired(d), payload, qos=1, retain=True) for d in ids)
        )
        return t0
    finally:
        await pub.disconnect()


async def _receive(spec: dict[str, Any]) -> None:
    accounts: dict[str, str] = spec["accounts"]
    topics = Topics(spec["topic_root"])
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    clients: list[Connection] = []
    received = 0
    last_at = 0.0
    all_in = asyncio.Event()

    async def connect(device_id: str) -> None:
        client = Connection(
            spec["host"],
            spec["port"],
            username=device_id,
            password=accounts[device_id],
            client_id=device_id,
        )
        async with gate:
            await client.connect()
            clients.append(client)
            await client.subscribe(topics.desired(device_id), retained=False)

    async def listen(client: Connection) -> None:
        nonlocal received, last_at
        async for _message in client.messages:
            received += 1
            last_at = time.time()
            if received == len(accounts):
                all_in.set()
            return

    t0 = time.perf_counter()
    await asyncio.gather(*(connect(d) for d in accounts))
    print(json.dumps({"connect_s": time.perf_counter() - t0}), flush=True)
    listeners = [asyncio.create_task(listen(c)) for c in clients]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), float(spec["timeout"]))
        print(json.dumps({"last_at": last_at, "received": received}), flush=True)
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


def main() -> None:
    """A baseline receiver: a JSON spec on stdin, JSON lines on stdout."""
    spec = json.loads(sys.stdin.readline())
    raise_open_files_limit(len(spec["accounts"]) + 512)
    asyncio.run(_receive(spec))


if __name__ == "__main__":
    main()
