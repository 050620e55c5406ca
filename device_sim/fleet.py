"""Provisioning a simulated fleet and running it on one asyncio loop.

Every device has its own MQTT connection and credentials. paho's own loop
uses select(), which breaks past ~1 000 sockets; aiomqtt drives paho from
asyncio's epoll loop instead. Blocking work (TUF verification, gRPC
downloads) runs in a small thread pool over one shared gRPC channel.

Each device keeps its state under ``state_dir/<device id>/``: trusted TUF
metadata and the trust state, its installed features, its event numbers and
the bundles it verified. `SimulatedFleet.restart` power-cycles one device on
that state.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc

from device_sim.device import DeviceRecord, SimDevice
from device_sim.profile import DeviceProfile, FailureProfile, HealthProfile, SkewedClock
from device_sim.source import Deadlines, GrpcSource
from device_sim.state import STATE_FILE, InstalledFeatures
from ota.clock import Clock, SystemClock
from ota.errors import NotFound
from ota.transport.mqtt import BrokerAddress
from ota.transport.topics import Topics
from ota.trust.device import DeviceTrust, RetryPolicy
from ota.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

REGISTER_BATCH = 1000
CONNECTS_AT_ONCE = 64


@dataclass(frozen=True)
class FleetSettings:
    """How to reach the control plane, and how the simulated devices behave.

    `clock_skew` maps a device id to how far its clock is off (e.g. a
    `device_sim.profile.ClockSkew`); `retry` and `deadlines` govern metadata and
    bundle transfers. `durable=False` (the default) skips fsync: a killed
    simulator loses nothing either way, since every state write is a rename;
    fsync only guards against power loss of the machine running it.
    """

    server: str
    admin_token: str
    trusted_root: bytes
    state_dir: Path
    failures: FailureProfile
    seed: int = 1
    workers: int = 8
    clock_skew: Callable[[str], timedelta] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    deadlines: Deadlines = field(default_factory=Deadlines)
    durable: bool = False
    # Probability, per model, that a device's health sample after activation reports a crash.
    crash_rates: dict[str, float] = field(default_factory=dict)
    # Crash probability per model and feature version (overrides `crash_rates`).
    health: HealthProfile = field(default_factory=HealthProfile)
    # Seconds between the periodic health samples of every online device (0: none).
    health_interval: float = 0.0
    # Every n-th event of each device is published twice with the same seq (0: never).
    duplicate_every: int = 0


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
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._secrets: dict[str, str] = {}
        self._topics: Topics | None = None
        self._address: BrokerAddress | None = None
        self._rng = random.Random(settings.seed)

    def start(self, timeout: float = 120.0) -> None:
        """Provision, connect every device, and return once all are subscribed."""
        self._secrets, mqtt_url, topic_root = provision(
            self._channel, self.settings.admin_token, self.profiles
        )
        address = self._address = BrokerAddress.parse(mqtt_url)
        self._topics = Topics(topic_root)
        self.devices = [self._device(p) for p in self.profiles]
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._connect_all(address), self._loop)
        future.result(timeout=timeout)

    def add(self, profiles: list[DeviceProfile], *, timeout: float = 120.0) -> list[SimDevice]:
        """Register more devices while the fleet runs (late registrations) and connect them."""
        assert self._address is not None, "start() the fleet first"
        address = self._address
        secrets, _, _ = provision(self._channel, self.settings.admin_token, profiles)
        self._secrets.update(secrets)
        self.profiles = [*self.profiles, *profiles]

        async def join() -> list[SimDevice]:
            new = [self._device(p) for p in profiles]
            self.devices.extend(new)
            await self._connect(new, address)
            return new

        return asyncio.run_coroutine_threadsafe(join(), self._loop).result(timeout=timeout)

    def device(self, device_id: str) -> SimDevice:
        """The running device with this id."""
        for d in self.devices:
            if d.device_id == device_id:
                return d
        raise NotFound(f"no simulated device {device_id!r}", field="device_id")

    def restart(self, device_id: str, *, timeout: float = 60.0) -> SimDevice:
        """Power-cycle one device: stop it wherever it is, boot it again from its state dir.

        The new device has the same id, credentials and state directory, and the
        same `DeviceRecord` (what the simulator saw it do). It returns once the
        device is connected again; it then finishes any work in flight
        (`SimDevice.resumed` tells when). Meant for a device halted by a power cut
        or at rest: a verification the old device handed to a worker thread is
        not interrupted and could still write to the state directory.
        """
        old = self.device(device_id)
        assert self._address is not None, "start() the fleet first"
        address = self._address

        async def cycle() -> SimDevice:
            task = self._tasks.pop(device_id, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            new = self._device(old.profile, record=old.record)
            self.devices[self.devices.index(old)] = new
            self._tasks[device_id] = asyncio.create_task(new.run(address.host, address.port))
            await new.connected.wait()
            return new

        return asyncio.run_coroutine_threadsafe(cycle(), self._loop).result(timeout=timeout)

    def _device(self, p: DeviceProfile, *, record: DeviceRecord | None = None) -> SimDevice:
        settings = self.settings
        assert self._topics is not None
        state_dir = settings.state_dir / p.device_id
        source = GrpcSource(
            self._channel, p.device_id, self._secrets[p.device_id], deadlines=settings.deadlines
        )
        skew = settings.clock_skew(p.device_id) if settings.clock_skew else timedelta(0)
        clock: Clock = SkewedClock(self.clock, skew) if skew else self.clock
        trust = DeviceTrust(
            device_id=p.device_id,
            model=p.model,
            firmware=p.firmware,
            state_dir=state_dir,
            trusted_root=settings.trusted_root,
            source=source,
            clock=clock,
            retry=settings.retry,
            durable=settings.durable,
        )
        return SimDevice(
            p,
            secret=self._secrets[p.device_id],
            trust=trust,
            topics=self._topics,
            failures=settings.failures,
            executor=self._executor,
            rng=random.Random(self._rng.random()),
            clock=clock,
            pull_desired=source.desired_state,
            seq_file=state_dir / "event-seq",
            features=InstalledFeatures.load(state_dir / STATE_FILE, durable=settings.durable),
            record=record,
            crash_rate=settings.crash_rates.get(p.model, 0.0),
            health=settings.health,
            health_interval=settings.health_interval,
            duplicate_every=settings.duplicate_every,
        )

    async def _connect_all(self, address: BrokerAddress) -> None:
        await self._connect(self.devices, address)

    async def _connect(self, devices: list[SimDevice], address: BrokerAddress) -> None:
        gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

        async def connect(device: SimDevice) -> None:
            async with gate:
                self._tasks[device.device_id] = asyncio.create_task(
                    device.run(address.host, address.port)
                )
                await device.connected.wait()

        await asyncio.gather(*(connect(d) for d in devices))

    def disconnect(self, device_ids: list[str], *, timeout: float = 60.0) -> None:
        """Take devices offline (churn): each says `online=false` and drops its connection.

        While offline they miss nothing for good: their desired state stays
        retained on the broker, and `reconnect` brings them back to it.
        """

        async def leave(device_id: str) -> None:
            device = self.device(device_id)
            await device.go_offline()
            task = self._tasks.pop(device_id, None)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        async def leave_all() -> None:
            await asyncio.gather(*(leave(d) for d in device_ids))

        asyncio.run_coroutine_threadsafe(leave_all(), self._loop).result(timeout=timeout)

    def reconnect(self, device_ids: list[str], *, timeout: float = 60.0) -> None:
        """Bring devices taken offline by `disconnect` back; returns once they are connected."""
        assert self._address is not None, "start() the fleet first"
        address = self._address

        async def back(device_id: str) -> None:
            device = self.device(device_id)
            self._tasks[device_id] = asyncio.create_task(device.run(address.host, address.port))
            await device.connected.wait()

        async def all_back() -> None:
            await asyncio.gather(*(back(d) for d in device_ids))

        asyncio.run_coroutine_threadsafe(all_back(), self._loop).result(timeout=timeout)

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
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

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
