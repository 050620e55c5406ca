"""Provisioning a simulated fleet and running it on one asyncio loop.

Every device has its own MQTT connection and credentials. paho's own loop
uses select(), which breaks past ~1 000 sockets; aiomqtt drives paho from
asyncio's epoll loop instead. Blocking work (TUF verification, gRPC
downloads) runs in a small thread pool over one shared gRPC channel.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from device_sim.device import SimDevice
from device_sim.profile import DeviceProfile, FailureProfile
from device_sim.source import GrpcSource
from ota.clock import Clock, SystemClock
from ota.transport.mqtt import BrokerAddress
from ota.transport.topics import Topics
from ota.trust.device import DeviceTrust
from ota.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

REGISTER_BATCH = 1000
CONNECTS_AT_ONCE = 64


@dataclass(frozen=True)
class FleetSettings:
    server: str
    admin_token: str
    trusted_root: bytes
    state_dir: Path
    failures: FailureProfile
    seed: int = 1
    workers: int = 8


def provision(
    channel: grpc.Channel, token: str, profiles: list[DeviceProfile]
) -> tuple[dict[str, str], str, str]:
    """Register the devices; returns their secrets, the broker URL and topic root."""
    stub = fleet_pb2_grpc.FleetServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),)
    secrets: dict[str, str] = {}
    mqtt_url = topic_root = ""
    for i in range(0, len(profiles), REGISTER_BATCH):
        batch = profiles[i : i + REGISTER_BATCH]
        response = stub.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=p.device_id, model=p.model, region=p.region, firmware=p.firmware
                    )
                    for p in batch
                ]
            ),
            metadata=metadata,
            timeout=60,
        )
        secrets.update({c.device_id: c.secret for c in response.credentials})
        mqtt_url, topic_root = response.mqtt_url, response.topic_root
    return secrets, mqtt_url, topic_root


class SimulatedFleet:
    """N devices on one event loop in a background thread."""

    def __init__(
        self, profiles: list[DeviceProfile], settings: FleetSettings, clock: Clock | None = None
    ) -> None:
        self.profiles = profiles
        self.settings = settings
        self.clock = clock or SystemClock()
        self.devices: list[SimDevice] = []
        self._channel = grpc.insecure_channel(settings.server)
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="sim-verify")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-loop", daemon=True)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, timeout: float = 120.0) -> None:
        """Provision, connect every device, and return once all are subscribed."""
        secrets, mqtt_url, topic_root = provision(
            self._channel, self.settings.admin_token, self.profiles
        )
        address = BrokerAddress.parse(mqtt_url)
        topics = Topics(topic_root)
        rng = random.Random(self.settings.seed)
        for p in self.profiles:
            source = GrpcSource(self._channel, p.device_id, secrets[p.device_id])
            trust = DeviceTrust(
                device_id=p.device_id,
                model=p.model,
                firmware=p.firmware,
                state_dir=self.settings.state_dir / p.device_id,
                trusted_root=self.settings.trusted_root,
                source=source,
                clock=self.clock,
            )
            self.devices.append(
                SimDevice(
                    p,
                    secret=secrets[p.device_id],
                    trust=trust,
                    topics=topics,
                    failures=self.settings.failures,
                    executor=self._executor,
                    rng=random.Random(rng.random()),
                    clock=self.clock,
                    pull_desired=source.desired_state,
                    seq_file=self.settings.state_dir / p.device_id / "event-seq",
                )
            )
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._connect_all(address), self._loop)
        future.result(timeout=timeout)

    async def _connect_all(self, address: BrokerAddress) -> None:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

        async def connect(device: SimDevice) -> None:
            async with gate:
                self._tasks.append(asyncio.create_task(device.run(address.host, address.port)))
                await device.connected.wait()

        await asyncio.gather(*(connect(d) for d in self.devices))

    def outcomes(self, rollout_id: str) -> Counter[str]:
        """The last state each device reported for a rollout, counted."""
        return Counter(
            d.record.last_state[rollout_id]
            for d in self.devices
            if rollout_id in d.record.last_state
        )

    def failure_reasons(self, rollout_id: str) -> Counter[str]:
        """Why devices failed a rollout, including those reverted since."""
        return Counter(
            d.record.failed_reason[rollout_id]
            for d in self.devices
            if rollout_id in d.record.failed_reason
        )

    def stop(self) -> None:
        async def cancel() -> None:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(timeout=60)
            except TimeoutError:
                log.warning("some simulated devices did not disconnect in time")
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._channel.close()
