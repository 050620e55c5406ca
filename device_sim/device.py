"""One simulated device: keeps an MQTT session, verifies, downloads, installs, reports.

Written the way firmware would be: it trusts only its provisioned TUF root,
checks every desired state and bundle with `ota.trust.device`, and reports
each step as a `DeviceEvent` with a sequence number of its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from device_sim.profile import DeviceProfile, FailureProfile
from ota.clock import Clock
from ota.errors import VerificationError
from ota.transport.topics import Topics
from ota.trust.device import DeviceTrust, StaleDesiredState
from ota.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


class EventSequence:
    """Event numbers that keep increasing across restarts.

    The file holds a high-water mark reserved ahead of use, so it is written
    once per `BLOCK` events; a restart skips the unused rest of the block.
    """

    BLOCK = 1000

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._reserved = int(path.read_text()) if path is not None and path.exists() else 0
        self._last = self._reserved

    def next(self) -> int:
        self._last += 1
        if self._last > self._reserved:
            self._reserved = self._last + self.BLOCK
            if self._path is not None:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._path.with_suffix(".tmp")
                tmp.write_text(str(self._reserved))
                os.replace(tmp, self._path)
        return self._last


@dataclass
class Installed:
    version: str
    sha256: bytes
    active: bool = True


@dataclass
class DeviceRecord:
    """What the device did, for checking the control plane's report against."""

    last_state: dict[str, str] = field(default_factory=dict)  # rollout_id -> state
    last_reason: dict[str, str] = field(default_factory=dict)
    failed_reason: dict[str, str] = field(default_factory=dict)  # kept after a revert
    events_sent: int = 0


class SimDevice:
    def __init__(
        self,
        profile: DeviceProfile,
        *,
        secret: str,
        trust: DeviceTrust,
        topics: Topics,
        failures: FailureProfile,
        executor: Executor,
        rng: random.Random,
        clock: Clock,
        pull_desired: Callable[[str], bytes | None] | None = None,
        seq_file: Path | None = None,
    ) -> None:
        self.profile = profile
        self.clock = clock
        self.pull_desired = pull_desired
        self.secret = secret
        self.trust = trust
        self.topics = topics
        self.failures = failures
        self.executor = executor
        self.rng = rng
        self.installed: dict[str, Installed] = {}
        self.last_known_good: dict[str, Installed] = {}
        self.record = DeviceRecord()
        self.sequence = EventSequence(seq_file)
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    @property
    def device_id(self) -> str:
        return self.profile.device_id

    async def run(self, host: str, port: int) -> None:
        """Stay connected until cancelled; reconnect with backoff."""
        delay = 0.5
        while True:
            try:
                await self._session(host, port)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                log.debug("%s: broker connection lost (%s)", self.device_id, exc)
                await asyncio.sleep(delay * (0.5 + self.rng.random()))
                delay = min(delay * 2, 10.0)

    async def _session(self, host: str, port: int) -> None:
        will = aiomqtt.Will(
            self.topics.state(self.device_id),
            self._reported(online=False),
            qos=1,
            retain=True,
        )
        async with aiomqtt.Client(
            host,
            port,
            username=self.device_id,
            password=self.secret,
            identifier=self.device_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=will,
            keepalive=60,
        ) as client:
            self._client = client
            await client.subscribe(self.topics.desired(self.device_id), qos=1)
            await client.publish(
                self.topics.state(self.device_id), self._reported(online=True), qos=1, retain=True
            )
            self.connected.set()
            if self.pull_desired is not None:
                # A broker without persistence has no retained state to give: ask the
                # control plane directly. The same checks apply; a duplicate is stale.
                try:
                    pulled = await self._blocking(self.pull_desired, self.device_id)
                except grpc.RpcError as exc:
                    log.info("%s: could not pull its desired state: %s", self.device_id, exc)
                    pulled = None
                if pulled:
                    await self.on_desired(pulled)
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray) and payload:
                    await self.on_desired(bytes(payload))

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def on_desired(self, envelope: bytes) -> None:
        try:
            state = await self._blocking(self.trust.verify_desired_state, envelope)
        except StaleDesiredState:
            return  # a retained copy of what it already has, or an older replay
        except VerificationError as exc:
            await self._refuse_unverified(envelope, exc)
            return
        for assignment in state.features:
            await self.apply(assignment)
        await self._publish_state()

    async def apply(self, a: common_pb2.FeatureAssignment) -> None:
        current = self.installed.get(a.feature)
        if a.revert:
            await self._revert(a, current)
            return
        if not a.active:
            if current is not None and current.active:
                current.active = False
                await self.report(a, "DEACTIVATED")
            return
        if current is not None and current.sha256 == a.sha256:
            return  # already running exactly this bundle
        await self.report(a, "NOTIFIED")
        await self.report(a, "DOWNLOADING")
        try:
            await self._blocking(self.trust.fetch_bundle, a)
        except VerificationError as exc:
            await self.report(a, "FAILED", reason=exc.reason, detail=str(exc))
            return
        await self.report(a, "DOWNLOADED")
        await self.report(a, "VERIFIED")
        await self.report(a, "INSTALLING")
        if self.failures.install_fails(self.profile.model, a.version, self.rng):
            await self.report(
                a, "FAILED", reason="INSTALL_FAILED", detail="simulated install failure"
            )
            return
        if current is not None:
            self.last_known_good[a.feature] = current
        self.installed[a.feature] = Installed(a.version, a.sha256)
        await self.report(a, "INSTALLED")
        await self.report(a, "ACTIVE")

    async def _revert(self, a: common_pb2.FeatureAssignment, current: Installed | None) -> None:
        good = self.last_known_good.get(a.feature)
        if a.active and good is not None and good.sha256 == a.sha256:
            self.installed[a.feature] = good  # reactivate without downloading
        elif not a.active and current is not None:
            current.active = False
        elif current is not None and current.sha256 == a.sha256:
            pass  # the failed install never replaced it: already on last-known-good
        elif a.active:
            await self.report(
                a, "FAILED", reason="ROLLBACK_REFUSED", detail="no such last-known-good"
            )
            return
        await self.report(a, "ROLLED_BACK")

    async def _refuse_unverified(self, envelope: bytes, exc: VerificationError) -> None:
        """Report a refusal, attributed to the rollouts the (unverified) payload names."""
        log.info("%s refused a desired state: %s", self.device_id, exc)
        rollouts: list[common_pb2.FeatureAssignment] = []
        try:
            env = common_pb2.Envelope.FromString(envelope)
            rollouts = list(common_pb2.DesiredState.FromString(env.payload).features)
        except Exception:
            rollouts = []
        for a in rollouts or [common_pb2.FeatureAssignment()]:
            await self.report(a, "FAILED", reason=exc.reason, detail=str(exc))

    async def report(
        self, a: common_pb2.FeatureAssignment, state: str, *, reason: str = "", detail: str = ""
    ) -> None:
        seq = self.sequence.next()
        now = Timestamp()
        now.FromDatetime(self.clock.now())
        event = common_pb2.DeviceEvent(
            device_id=self.device_id,
            seq=seq,
            rollout_id=a.rollout_id,
            bundle_sha256=a.sha256,
            state=common_pb2.DeviceState.Value(state),
            error_code=common_pb2.FailureReason.Value(reason) if reason else 0,  # type: ignore[arg-type]
            detail=detail[:200],
            time=now,
            feature=a.feature,
            version=a.version,
        )
        if a.rollout_id:
            self.record.last_state[a.rollout_id] = state
            self.record.last_reason[a.rollout_id] = reason
            if state == "FAILED":
                self.record.failed_reason[a.rollout_id] = reason
        self.record.events_sent += 1
        assert self._client is not None
        await self._client.publish(
            self.topics.events(self.device_id), event.SerializeToString(), qos=1
        )

    def _reported(self, *, online: bool) -> bytes:
        now = Timestamp()
        now.FromDatetime(self.clock.now())
        return common_pb2.ReportedState(
            device_id=self.device_id,
            online=online,
            features=[
                common_pb2.InstalledFeature(
                    feature=name, version=i.version, sha256=i.sha256, active=i.active
                )
                for name, i in sorted(self.installed.items())
            ],
            time=now,
        ).SerializeToString()

    async def _publish_state(self) -> None:
        if self._client is not None:
            await self._client.publish(
                self.topics.state(self.device_id), self._reported(online=True), qos=1, retain=True
            )
