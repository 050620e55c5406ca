"""The simulator's MQTT driver (`device_sim.mqtt`) against a real Mosquitto with ota's config.

Many paho clients on one asyncio loop: connect, subscribe, receive, QoS 1
PUBACKs (and the ACL's refusals), the Last Will on a lost connection, a clean
leave without it, and a refused password.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from device_sim.mqtt import Connection, MqttError, Will
from ota.broker.process import raise_open_files_limit
from ota.transport.topics import Topics
from tests.broker_harness import BrokerHandle, private_broker

pytestmark = pytest.mark.integration

TOPICS = Topics()
DEVICES = [f"dev-{i:03d}" for i in range(200)]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with private_broker(tmp_path) as handle:
        yield handle


def connection(broker: BrokerHandle, device_id: str, secret: str, **kw: Any) -> Connection:
    return Connection(
        broker.host, broker.port, username=device_id, password=secret, client_id=device_id, **kw
    )


def test_many_devices_on_one_loop_connect_subscribe_receive_and_are_acked(
    broker: BrokerHandle,
) -> None:
    secrets = broker.add_devices(DEVICES)

    async def scenario() -> None:
        devices = [connection(broker, d, secrets[d]) for d in DEVICES]
        await asyncio.gather(*(c.connect() for c in devices))
        try:
            assert all(
                await asyncio.gather(
                    *(c.subscribe(TOPICS.desired(d)) for c, d in zip(devices, DEVICES, strict=True))
                )
            )
            control = connection(broker, broker.control_username, broker_control_secret(broker))
            async with control:
                for d in DEVICES:
                    assert await control.publish(TOPICS.desired(d), d.encode(), retain=True)

            async def first(c: Connection) -> bytes:
                async for message in c.messages:
                    return bytes(message.payload)
                raise AssertionError("no message")

            got = await asyncio.wait_for(asyncio.gather(*(first(c) for c in devices)), 60)
            assert got == [d.encode() for d in DEVICES]
            # Its own topics are acked; another device's are refused (MQTT 5 PUBACK).
            a, b = devices[0], devices[1]
            assert await a.publish(TOPICS.events(DEVICES[0]), b"x")
            assert not await a.publish(TOPICS.events(DEVICES[1]), b"x")
            assert not await b.publish(TOPICS.desired(DEVICES[1]), b"x")
        finally:
            await asyncio.gather(*(c.disconnect() for c in devices))

    asyncio.run(asyncio.wait_for(scenario(), 120))


def broker_control_secret(broker: BrokerHandle) -> str:
    return broker.control_password


def test_a_lost_connection_publishes_the_will_and_a_clean_leave_does_not(
    broker: BrokerHandle,
) -> None:
    secrets = broker.add_devices(["dev-a", "dev-b", "watcher"])
    state_a, state_b = TOPICS.state("dev-a"), TOPICS.state("dev-b")

    async def scenario() -> None:
        watcher = connection(broker, broker.control_username, broker_control_secret(broker))
        async with watcher:
            await watcher.subscribe(f"{TOPICS.root}/devices/+/state")
            a = connection(broker, "dev-a", secrets["dev-a"], will=Will(state_a, b"gone", 1, True))
            b = connection(broker, "dev-b", secrets["dev-b"], will=Will(state_b, b"gone", 1, True))
            await a.connect()
            await b.connect()
            await b.disconnect()  # clean: no Will
            a._drop()  # the socket closes without DISCONNECT: the broker sends the Will
            with pytest.raises(MqttError):
                await a.publish(TOPICS.events("dev-a"), b"x")
            # Had b's clean leave sent its Will, it would arrive first: it happened before.
            async for message in watcher.messages:
                assert (message.topic, bytes(message.payload)) == (state_a, b"gone")
                break

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_wrong_password_is_refused_with_mqtt_error(broker: BrokerHandle) -> None:
    broker.add_devices(["dev-a"])

    async def scenario() -> None:
        with pytest.raises(MqttError, match=r"refused|disconnected|closed"):
            await connection(broker, "dev-a", "not-the-secret", connect_timeout=10).connect()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_broker_open_file_limit_is_raised_for_its_connections(broker: BrokerHandle) -> None:
    # The harness's broker runs under MosquittoProcess, which raised its limit at start.
    soft, _hard = resource.prlimit(broker_pid(broker), resource.RLIMIT_NOFILE)
    assert soft >= min(4096, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert raise_open_files_limit(os.getpid(), 256) >= 256


def broker_pid(broker: BrokerHandle) -> int:
    assert broker.process is not None and broker.process.pid is not None
    return broker.process.pid
