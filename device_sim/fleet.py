"""Provisioning a simulated fleet and running it on one asyncio loop.

Every device has its own MQTT connection and credentials; `device_sim.mqtt`
drives all their paho clients from the one asyncio loop (epoll), with no
thread or task per connection. Blocking work (TUF verification, gRPC
downloads) runs in a small thread pool over one shared gRPC channel.

Each device keeps its state under ``state_dir/<device id>/``: trusted TUF
metadata and the trust state, its installed features, its event numbers and
the bundles it verified. `SimulatedFleet.restart` power-cycles one device on
that state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import urllib3

from device_sim.behaviours import Misbehaving, churn
from device_sim.device import DeviceRecord, SimDevice
from device_sim.mqtt import MqttError, raise_open_files_limit
from device_sim.profile import DeviceProfile, FailureProfile, HealthProfile, SkewedClock
from device_sim.scenario import Scenario
from ota.clock import Clock, SystemClock
from ota.device.enroll import Identity, enroll, renew
from ota.device.http_source import HttpSource
from ota.device.retry import RetryPolicy
from ota.device.source import Deadlines, GrpcSource
from ota.device.state import STATE_FILE, InstalledFeatures
from ota.device.trust import DeviceTrust, MetadataSource
from ota.errors import InvalidArgument, NotFound
from ota.tls import CHANNEL_OPTIONS
from ota.transport.mqtt import BrokerAddress
from ota.transport.topics import Topics
from ota.v1 import fleet_pb2, fleet_pb2_grpc

log = logging.getLogger(__name__)

REGISTER_BATCH = 1000
# Devices back off themselves (`RetryPolicy`): the channel need only try again soon
# after an outage, not after gRPC's default of up to two minutes.
DEVICE_CHANNEL_OPTIONS = CHANNEL_OPTIONS
# Connections waiting for their CONNACK at once. Mosquitto listens with a
# backlog of 100; beyond it the kernel drops SYNs and a connect waits a second.
CONNECTS_AT_ONCE = 64
# Open files besides the devices' sockets (gRPC, state files, the interpreter's).
SPARE_FILES = 512


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
    # After subscribing, each device also asks the control plane for its desired state
    # (DECISIONS: "Devices pull on connect"). A fleet on a broker with persistence may
    # skip it: 10 000 devices connecting at once are 10 000 GetDesiredState calls.
    pull_on_connect: bool = True
    # Per-device failures, crashes, latency, churn and misbehaviour (`--scenario`).
    scenario: Scenario | None = None
    # Where devices fetch TUF metadata and bundles: "grpc" (the control plane) or
    # "http" (`origin_url`: the delivery origin, or a cache or CDN in front of it).
    delivery: str = "grpc"
    origin_url: str = ""
    origin_token: str = ""
    # The CA of the origin's (or cache's) HTTPS certificate; None: the system's CAs.
    # A certificate device presents its certificate there too (mutual TLS).
    origin_ca: Path | None = None

    # "password" (a secret per device) or "cert": each device enrolls for a
    # certificate with a one-time token and speaks mutual TLS to the broker and
    # to `device_server`, the control plane's device port; `server_ca` (PEM
    # file) checks both servers' certificates.
    identity: str = "password"
    device_server: str = ""
    server_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.delivery not in ("grpc", "http"):
            raise InvalidArgument(f"{self.delivery!r} is not grpc or http", field="delivery")
        if self.delivery == "http" and not self.origin_url.startswith(("http://", "https://")):
            raise InvalidArgument(
                "HTTP delivery needs an http:// or https:// origin URL", field="origin_url"
            )


def provision(
    channel: grpc.Channel,
    token: str,
    profiles: list[DeviceProfile],
    *,
    certificates: bool = False,
) -> tuple[dict[str, str], str, str]:
    """Register the devices; returns their secrets (or enrollment tokens), broker URL, topic root."""
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
                        device_id=p.device_id,
                        model=p.model,
                        region=p.region,
                        firmware=p.firmware,
                        labels=dict(p.labels),
                    )
                    for p in batch
                ],
                identity=(
                    fleet_pb2.DEVICE_IDENTITY_CERTIFICATE
                    if certificates
                    else fleet_pb2.DEVICE_IDENTITY_PASSWORD
                ),
            ),
            metadata=metadata,
            timeout=60,
        )
        secrets.update({c.device_id: c.enrollment_token or c.secret for c in response.credentials})
        mqtt_url, topic_root = response.mqtt_url, response.topic_root
    return secrets, mqtt_url, topic_root


class FleetStopping(Exception):
    """Raised in a device's retry pause when the fleet stops: the device gives up quietly."""


class SimulatedFleet:
    """N devices on one event loop in a background thread."""

    def __init__(
        self, profiles: list[DeviceProfile], settings: FleetSettings, clock: Clock | None = None
    ) -> None:
        self.profiles = profiles
        self.settings = settings
        self.clock = clock or SystemClock()
        self.devices: list[SimDevice] = []
        # Over TLS when a server CA is given: an enrollment token is a credential.
        self._channel = (
            grpc.secure_channel(
                settings.server,
                grpc.ssl_channel_credentials(root_certificates=settings.server_ca.read_bytes()),
                options=DEVICE_CHANNEL_OPTIONS,
            )
            if settings.server_ca
            else grpc.insecure_channel(settings.server, options=DEVICE_CHANNEL_OPTIONS)
        )
        # Set by `stop`: a device waiting out an unreachable control plane stops waiting.
        self._stopping = threading.Event()
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="sim-verify")
        self._downloads = ThreadPoolExecutor(settings.workers, thread_name_prefix="sim-download")
        # One connection pool for every device's HTTP fetches, as they share one channel.
        self._http = urllib3.PoolManager(
            maxsize=2 * settings.workers,
            ca_certs=str(settings.origin_ca) if settings.origin_ca else None,
        )
        self._device_pools: dict[str, urllib3.PoolManager] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-loop", daemon=True)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._secrets: dict[str, str] = {}
        self._device_channels: dict[str, grpc.Channel] = {}
        self._renew_at: dict[str, datetime] = {}  # when each certificate is due for renewal
        self._topics: Topics | None = None
        self._address: BrokerAddress | None = None
        self._rng = random.Random(settings.seed)
        # Seconds each phase of `start` took: provision_s, build_s, connect_s.
        self.timings: dict[str, float] = {}
        self.misbehaving: list[Misbehaving] = []
        self._by_id: dict[str, SimDevice] = {}
        self._behaviours: list[asyncio.Task[None]] = []

    def start(self, timeout: float = 120.0) -> None:
        """Provision, connect every device, and return once all are subscribed."""
        self.prepare()
        self.connect(timeout=timeout)

    def prepare(self) -> None:
        """Register the devices and build them from their state directories; no connection yet."""
        t0 = time.perf_counter()
        self._secrets, mqtt_url, topic_root = provision(
            self._channel, self.settings.admin_token, self.profiles, certificates=self._certs
        )
        if self._certs:
            self._enroll(self.profiles)
        t1 = time.perf_counter()
        self._address = BrokerAddress.parse(mqtt_url)
        self._topics = Topics(topic_root)
        raise_open_files_limit(len(self.profiles) + SPARE_FILES)
        self.devices = [self._device(p) for p in self.profiles]
        self._by_id = {d.device_id: d for d in self.devices}
        self.timings.update(provision_s=t1 - t0, build_s=time.perf_counter() - t1)

    def connect(self, timeout: float = 120.0) -> None:
        """Connect every prepared device; returns once all are connected and subscribed."""
        assert self._address is not None, "prepare() the fleet first"
        t0 = time.perf_counter()
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._connect_all(self._address), self._loop)
        future.result(timeout=timeout)
        self.timings["connect_s"] = time.perf_counter() - t0

    def add(self, profiles: list[DeviceProfile], *, timeout: float = 120.0) -> list[SimDevice]:
        """Register more devices while the fleet runs (late registrations) and connect them."""
        assert self._address is not None, "start() the fleet first"
        address = self._address
        secrets, _, _ = provision(
            self._channel, self.settings.admin_token, profiles, certificates=self._certs
        )
        self._secrets.update(secrets)
        if self._certs:
            self._enroll(profiles)
        self.profiles = [*self.profiles, *profiles]
        raise_open_files_limit(len(self.profiles) + SPARE_FILES)

        async def join() -> list[SimDevice]:
            new = [self._device(p) for p in profiles]
            self.devices.extend(new)
            await self._connect(new, address)
            return new

        return asyncio.run_coroutine_threadsafe(join(), self._loop).result(timeout=timeout)

    def device(self, device_id: str) -> SimDevice:
        """The running device with this id."""
        found = self._by_id.get(device_id)
        if found is not None:
            return found
        for d in self.devices:  # added since
            if d.device_id == device_id:
                self._by_id[device_id] = d
                return d
        raise NotFound(f"no simulated device {device_id!r}", field="device_id")

    def renew_due(self) -> list[str]:
        """Renew the certificate of every device two thirds into its lifetime.

        Each asks over its own mutual-TLS channel with a new key, then reconnects
        with the new certificate (the old one is refused from then on).
        """
        if not self._certs:
            return []
        renewed = []
        now = self.clock.now()
        for device_id in [d for d, when in self._renew_at.items() if when <= now]:
            directory = self._identity_dir(device_id)
            channel = self._device_channels.pop(device_id)
            try:
                identity = renew(channel, device_id)
            finally:
                channel.close()
            identity.save(directory)
            self._renew_at[device_id] = identity.renew_at()
            self.restart(device_id)
            renewed.append(device_id)
        return renewed

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
            self._by_id[device_id] = new
            self._tasks[device_id] = asyncio.create_task(new.run(address.host, address.port))
            await new.connected.wait()
            return new

        return asyncio.run_coroutine_threadsafe(cycle(), self._loop).result(timeout=timeout)

    def _pause(self, seconds: float) -> None:
        """A device's pause between retries, cut short when the fleet stops."""
        if self._stopping.wait(seconds):
            raise FleetStopping("the fleet is stopping")

    @property
    def _certs(self) -> bool:
        return self.settings.identity == "cert"

    def _enroll(self, profiles: list[DeviceProfile]) -> None:
        """Each device makes its key and exchanges its one-time token for a certificate."""
        for p in profiles:
            identity = enroll(self._channel, p.device_id, self._secrets.pop(p.device_id))
            identity.save(self._identity_dir(p.device_id))
            self._renew_at[p.device_id] = identity.renew_at()

    def _identity_dir(self, device_id: str) -> Path:
        return self.settings.state_dir / device_id / "identity"

    def _device(self, p: DeviceProfile, *, record: DeviceRecord | None = None) -> SimDevice:
        settings = self.settings
        assert self._topics is not None
        state_dir = settings.state_dir / p.device_id
        tls: ssl.SSLContext | None = None
        http = self._http
        if self._certs:
            identity = Identity.load(self._identity_dir(p.device_id), p.device_id)
            server_ca = settings.server_ca.read_bytes() if settings.server_ca else None
            channel = self._device_channels.get(p.device_id)
            if channel is None:
                channel = grpc.secure_channel(
                    settings.device_server, identity.grpc_credentials(server_ca)
                )
                self._device_channels[p.device_id] = channel
            tls = identity.ssl_context(settings.server_ca, self._identity_dir(p.device_id))
            source = GrpcSource(channel, p.device_id, "", deadlines=settings.deadlines)
            if settings.delivery == "http":
                # A pool of its own: each device presents its own certificate (and a
                # renewed one after `restart`).
                http = identity.http_pool(settings.origin_ca, self._identity_dir(p.device_id))
                old = self._device_pools.pop(p.device_id, None)
                if old is not None:
                    old.clear()
                self._device_pools[p.device_id] = http
        else:
            source = GrpcSource(
                self._channel, p.device_id, self._secrets[p.device_id], deadlines=settings.deadlines
            )
        delivery: MetadataSource = source
        if settings.delivery == "http":
            delivery = HttpSource(
                settings.origin_url,
                deadlines=settings.deadlines,
                pool=http,
                token=settings.origin_token,
            )
        scenario = settings.scenario
        skew = settings.clock_skew(p.device_id) if settings.clock_skew else timedelta(0)
        clock: Clock = SkewedClock(self.clock, skew) if skew else self.clock
        trust = DeviceTrust(
            device_id=p.device_id,
            model=p.model,
            firmware=p.firmware,
            state_dir=state_dir,
            trusted_root=settings.trusted_root,
            source=delivery,
            clock=clock,
            retry=dataclasses.replace(settings.retry, sleep=self._pause),
            durable=settings.durable,
        )
        return SimDevice(
            p,
            secret=self._secrets.get(p.device_id, ""),
            trust=trust,
            tls=tls,
            topics=self._topics,
            failures=scenario.failures_for(p) if scenario else settings.failures,
            executor=self._executor,
            download_executor=self._downloads,
            rng=random.Random(self._rng.random()),
            clock=clock,
            pull_desired=source.desired_state if settings.pull_on_connect else None,
            seq_file=state_dir / "event-seq",
            features=InstalledFeatures.load(state_dir / STATE_FILE, durable=settings.durable),
            record=record,
            crash_rate=settings.crash_rates.get(p.model, 0.0),
            health=settings.health.merged(scenario.health_for(p)) if scenario else settings.health,
            health_interval=settings.health_interval,
            duplicate_every=settings.duplicate_every,
            latency=scenario.latency_for(p) if scenario else 0.0,
            durable=settings.durable,
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

        async def leave_all() -> None:
            await asyncio.gather(*(self._leave(d) for d in device_ids))

        asyncio.run_coroutine_threadsafe(leave_all(), self._loop).result(timeout=timeout)

    def reconnect(self, device_ids: list[str], *, timeout: float = 60.0) -> None:
        """Bring devices taken offline by `disconnect` back; returns once they are connected."""

        async def all_back() -> None:
            await asyncio.gather(*(self._back(d) for d in device_ids))

        asyncio.run_coroutine_threadsafe(all_back(), self._loop).result(timeout=timeout)

    async def _leave(self, device_id: str) -> None:
        device = self.device(device_id)
        with contextlib.suppress(MqttError):  # already gone: the broker sends its Will instead
            await device.go_offline()
        task = self._tasks.pop(device_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _back(self, device_id: str) -> None:
        assert self._address is not None, "start() the fleet first"
        device = self.device(device_id)
        self._tasks[device_id] = asyncio.create_task(
            device.run(self._address.host, self._address.port)
        )
        await device.connected.wait()

    def start_scenario(self) -> None:
        """Start the scenario's churn and misbehaviour on the running fleet."""
        scenario = self.settings.scenario
        if scenario is None:
            return
        assert self._topics is not None, "start() the fleet first"
        topics = self._topics
        by_id = {d.device_id: d for d in self.devices}
        # Rules pick from the scenario's whole fleet, of which this process may run a
        # slice (`--processes`): each picked device is run by whichever process has it.
        everyone = scenario.devices()
        ids = [p.device_id for p in everyone]
        position = {d: i for i, d in enumerate(ids)}

        async def begin() -> None:
            for rule in scenario.churn:
                chosen = [d for d in scenario.churning(rule, everyone) if d in by_id]
                if chosen:
                    self._behaviours.append(
                        asyncio.create_task(churn(rule, chosen, self._leave, self._back))
                    )
            for m in scenario.misbehaving:
                runner = Misbehaving(m, topics, random.Random(self._rng.random()))
                self.misbehaving.append(runner)
                for device_id in scenario.misbehaving_devices(m, everyone):
                    if device_id not in by_id:
                        continue
                    # Someone else's id to impersonate or write to: the next device along.
                    victim = ids[(position[device_id] + 1) % len(ids)]
                    self._behaviours.append(
                        asyncio.create_task(runner.run(by_id[device_id], victim))
                    )

        asyncio.run_coroutine_threadsafe(begin(), self._loop).result(timeout=30)

    def misbehaviour_counts(self) -> dict[str, dict[str, int]]:
        """Misbehaving messages by kind: those the broker took and those it refused."""
        sent: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        for m in self.misbehaving:
            sent.update(m.sent)
            refused.update(m.refused)
        return {"sent": dict(sent), "refused": dict(refused)}

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

    def wait_following(self, timeout: float) -> None:
        """Return once every device follows its desired-state topic (`SimDevice.following`)."""

        async def all_following() -> None:
            await asyncio.gather(*(d.following.wait() for d in self.devices))

        asyncio.run_coroutine_threadsafe(all_following(), self._loop).result(timeout=timeout)

    def stop(self) -> None:
        async def cancel() -> None:
            tasks = [*self._behaviours, *self._tasks.values()]
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
        # Only now (the devices' tasks are gone, so nothing reports it): wake the threads
        # still waiting out an unreachable control plane, so shutting down is quick.
        self._stopping.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._downloads.shutdown(wait=True, cancel_futures=True)
        self._channel.close()
        self._http.clear()
        for pool in self._device_pools.values():
            pool.clear()
        for channel in self._device_channels.values():
            channel.close()
