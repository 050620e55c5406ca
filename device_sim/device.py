"""One simulated device: keeps an MQTT session, verifies, downloads, installs, reports.

Written the way firmware would be: it trusts only its provisioned TUF root,
checks every desired state and bundle with `ota.device.trust`, and reports
each step as a `DeviceEvent` with a sequence number of its own. What it runs
(`ota.device.state`) and its event numbers survive a restart; a device whose
power was cut finishes its work when it boots again.

Versions only go up: an assignment of an older version than the one installed
is refused (ROLLBACK_REFUSED), unless it is a signed revert to exactly the
device's own last-known-good bundle, which is reactivated from disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from device_sim.mqtt import Connection, MqttError, Will
from device_sim.profile import DeviceProfile, FailureProfile, HealthProfile
from ota.clock import Clock
from ota.device.events import EventSequence
from ota.device.state import InstalledBundle, InstalledFeatures, reached_at_least
from ota.device.trust import DeviceTrust, StaleDesiredState, check_not_downgrade
from ota.domain.progress import Standing, advance, is_waiting
from ota.errors import VerificationError
from ota.transport.topics import Topics
from ota.v1 import common_pb2

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DeviceRecord:
    """What the device did, for checking the control plane's report against."""

    last_state: dict[str, str] = field(default_factory=dict)  # rollout_id -> state
    last_reason: dict[str, str] = field(default_factory=dict)
    failed_reason: dict[str, str] = field(default_factory=dict)  # kept after a revert
    events_sent: int = 0  # kept across a simulated restart (`SimulatedFleet.restart`)
    states_seen: dict[str, set[str]] = field(default_factory=dict)  # rollout_id -> states sent
    events_by_rollout: dict[str, int] = field(default_factory=dict)
    duplicates_sent: int = 0  # events published a second time with the same seq
    health_samples: dict[str, int] = field(default_factory=dict)  # rollout_id -> samples
    crashes: dict[str, int] = field(default_factory=dict)  # rollout_id -> crashes reported
    # Periodic samples (not tied to a rollout), by the feature version sampled
    # ("feature@version", or "" when the device runs no feature).
    periodic_samples: dict[str, int] = field(default_factory=dict)
    periodic_crashes: dict[str, int] = field(default_factory=dict)
    # Times the device gave up waiting for an unreachable control plane, by rollout.
    gave_up: dict[str, int] = field(default_factory=dict)
    # Periodic samples that reported using the feature, and the uses they reported.
    periodic_samples_used: dict[str, int] = field(default_factory=dict)
    periodic_uses: dict[str, int] = field(default_factory=dict)


class PowerCut(Exception):
    """The simulated power went off: the device stops where it is, mid-update."""


# Refusals a retry cannot change: the same signed inputs give the same answer.
FINAL_REASONS = frozenset({"ROLLBACK_REFUSED", "INCOMPATIBLE"})


class SimDevice:
    """One device. `crash_after_download(assignment)` returning True cuts the power
    once the bundle is downloaded and verified, before the install begins."""

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
        features: InstalledFeatures | None = None,
        record: DeviceRecord | None = None,
        crash_after_download: Callable[[common_pb2.FeatureAssignment], bool] | None = None,
        crash_rate: float = 0.0,
        health: HealthProfile | None = None,
        health_interval: float = 0.0,
        duplicate_every: int = 0,
        latency: float = 0.0,
        download_executor: Executor | None = None,
        durable: bool = True,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.profile = profile
        self.tls = tls
        self.clock = clock
        self.pull_desired = pull_desired
        self.secret = secret
        self.trust = trust
        self.topics = topics
        self.failures = failures
        self.executor = executor
        # Downloads wait on the network for long; on their own threads they do not hold
        # up the quick checks (a desired state's signature) of a fleet's other devices.
        self.download_executor = download_executor or executor
        self.rng = rng
        self.features = features or InstalledFeatures()
        self.record = record or DeviceRecord()
        self.sequence = EventSequence(seq_file, durable=durable)
        self.crash_after_download = crash_after_download
        # After activation the device sends one health sample, and while online one
        # every `health_interval` seconds (0: never) for each feature it runs, or one
        # for the device when it runs none. `health` says how likely a sample reports
        # a crash, per model and version; `crash_rate` is the same for every version.
        self.health = HealthProfile({("*", "*"): crash_rate}).merged(health or HealthProfile())
        self.health_interval = health_interval
        # Every n-th event is published twice with the same seq (a lost PUBACK, say).
        self.duplicate_every = duplicate_every
        # Seconds (on average; 0.5x to 1.5x) between receiving a desired state and acting
        # on it: a slow link or a busy device.
        self.latency = latency
        # A boot, not a session, leaves files of work cut short (partial downloads):
        # prune them now, before any download of this run can be in flight.
        self.features.prune(self.trust.downloads)
        self.connected = asyncio.Event()
        self.halted = False  # set by a power cut: the task ends, the state stays on disk
        self.resumed = False  # set once the work left from before a (re)boot is done
        # Set while the device waits on its desired-state topic: connected, its boot
        # work and its pull on connect done. Until then a new desired state queues.
        self.following = asyncio.Event()
        # Generations a session may legitimately see late: the retained copy that was
        # queued while the pull on connect fetched a newer one.
        self._late = range(0)
        self._client: Connection | None = None

    @property
    def device_id(self) -> str:
        return self.profile.device_id

    @property
    def connection(self) -> Connection | None:
        """The current MQTT session, while there is one (scenarios misbehave through it)."""
        return self._client

    @property
    def installed(self) -> Mapping[str, InstalledBundle]:
        return self.features.installed

    @property
    def last_known_good(self) -> Mapping[str, InstalledBundle]:
        return self.features.last_known_good

    async def run(self, host: str, port: int) -> None:
        """Stay connected until cancelled or the power is cut; reconnect with backoff."""
        delay = 0.5
        while True:
            try:
                await self._session(host, port)
            except PowerCut as cut:
                self.halted = True
                self.connected.clear()
                log.info("%s: power cut (%s)", self.device_id, cut)
                return
            except MqttError as exc:
                self.connected.clear()
                log.debug("%s: broker connection lost (%s)", self.device_id, exc)
                await asyncio.sleep(delay * (0.5 + self.rng.random()))
                delay = min(delay * 2, 10.0)
            except Exception:
                # A bug in the simulator, not a device fault: say so loudly.
                self.halted = True
                self.connected.clear()
                log.exception("%s: stopped by an unexpected error", self.device_id)
                raise

    async def _session(self, host: str, port: int) -> None:
        will = Will(
            self.topics.state(self.device_id),
            self._reported(online=False),
            qos=1,
            retain=True,
        )
        async with Connection(
            host,
            port,
            username=self.device_id,
            password=self.secret,
            client_id=self.device_id,
            tls=self.tls,
            will=will,
            keepalive=60,
        ) as client:
            self._client = client
            await client.subscribe(self.topics.desired(self.device_id), qos=1)
            await client.publish(
                self.topics.state(self.device_id), self._reported(online=True), qos=1, retain=True
            )
            self.connected.set()
            sampler = (
                asyncio.create_task(self._sample_health()) if self.health_interval > 0 else None
            )
            try:
                await self._serve(client)
            finally:
                if sampler is not None:
                    sampler.cancel()
                    await asyncio.gather(sampler, return_exceptions=True)

    async def _serve(self, client: Connection) -> None:
        """One connected session: finish left-over work, then follow the desired state."""
        # Every session, not only the first after a boot: a session lost in the middle
        # of an install (the broker restarted, say) leaves work that no newer desired
        # state will ask for again.
        await self.resume()
        if self.pull_desired is not None:
            # A broker without persistence has no retained state to give: ask the
            # control plane directly. The same checks apply; a duplicate is stale.
            try:
                pulled = await self._blocking(self.pull_desired, self.device_id)
            except grpc.RpcError as exc:
                log.info("%s: could not pull its desired state: %s", self.device_id, exc)
                pulled = None
            if pulled:
                before = self.trust.accepted_generation
                await self.on_desired(pulled)
                self._late = range(before, self.trust.accepted_generation)
        self.following.set()
        try:
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray) and payload:
                    if self.latency:
                        await asyncio.sleep(self.latency * (0.5 + self.rng.random()))
                    await self.on_desired(bytes(payload))
        finally:
            self.following.clear()

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def resume(self) -> None:
        """After a (re)boot, finish what the last accepted desired state asked.

        The retained copy of that state is not newer than the one accepted, so it
        is ignored as stale: the device works from its own verified copy.
        Assignments already carried out are no-ops; one stopped between download
        and install re-verifies its kept file against TUF and installs it.
        """
        # The accepted state is in memory since boot: no thread hop for a fleet's
        # worth of devices connecting at once.
        state = self.trust.accepted_state()
        if state is not None:
            for assignment in state.features:
                await self.apply(assignment)
            await self._publish_state()
        self.resumed = True

    async def on_desired(self, envelope: bytes) -> None:
        try:
            state = await self._blocking(self.trust.verify_desired_state, envelope)
        except StaleDesiredState as stale:
            if stale.generation != stale.accepted and stale.generation not in self._late:
                # Genuine but older than what it runs on: somebody replays it.
                await self._refuse_unverified(envelope, stale)
            return  # else a retained copy of what it already has
        except VerificationError as exc:
            await self._refuse_unverified(envelope, exc)
            return
        for assignment in state.features:
            await self.apply(assignment)
        await self._publish_state()

    async def apply(self, a: common_pb2.FeatureAssignment) -> None:
        """Bring one feature to what `a` asks, reporting each step once."""
        if self.features.is_settled(a):
            return  # a renewed copy of an order already carried out or refused
        flight = self.features.in_flight(a.feature)
        if flight is not None and not flight.is_for(a):
            self.features.abandon(a.feature)  # superseded; its file goes at the next save
        current = self.features.installed.get(a.feature)
        if a.revert:
            await self._revert(a, current)
        elif not a.active:
            await self._deactivate(a, current)
        elif current is not None and current.sha256 == a.sha256:
            await self._finish_install(a, current)
        else:
            await self._install(a, current)

    async def _install(
        self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None
    ) -> None:
        reached = self.features.reached(a)
        if reached is None:
            await self.report(a, "NOTIFIED")
            if current is not None:
                try:
                    check_not_downgrade(a, current.version)
                except VerificationError as exc:
                    await self._fail(a, exc.reason, str(exc))
                    return
            await self.report(a, "DOWNLOADING")
        path = await self._fetch(a)
        if path is None:
            return
        if not reached_at_least(reached, "VERIFIED"):
            await self.report(a, "DOWNLOADED")
            await self.report(a, "VERIFIED")
            self.features.mark(a, "VERIFIED", file=path)
            await self._save()
        if self.crash_after_download is not None and self.crash_after_download(a):
            raise PowerCut(f"after downloading {a.feature} {a.version}, before installing it")
        await self.report(a, "INSTALLING")
        if self.failures.install_fails(self.profile.model, a.version, self.rng):
            await self._fail(a, "INSTALL_FAILED", "simulated install failure")
            return
        installed = self.features.install(a, path)
        await self._save()
        await self._finish_install(a, installed)

    async def _fetch(self, a: common_pb2.FeatureAssignment) -> Path | None:
        """Download and verify `a`'s bundle; None once a failure was reported.

        A control plane out of reach for the whole retry window is said once
        (CONTROL_PLANE_UNREACHABLE, not a failure: the work stays in flight) and
        then waited for again, for as long as it takes.
        """
        said_unreachable = False
        while True:
            try:
                # After a restart this finds the kept file and re-verifies it against TUF.
                return await asyncio.get_running_loop().run_in_executor(
                    self.download_executor, self.trust.fetch_bundle, a
                )
            except VerificationError as exc:
                if not is_waiting(exc.reason):
                    await self._fail(a, exc.reason, str(exc))
                    return None
                if not said_unreachable:
                    log.info("%s: %s; still trying", self.device_id, exc)
                    await self.report(a, "FAILED", reason=exc.reason, detail=str(exc))
                    said_unreachable = True

    async def _finish_install(
        self, a: common_pb2.FeatureAssignment, current: InstalledBundle
    ) -> None:
        """`a`'s bundle is installed: make sure it is on, and say so once for `a`'s rollout.

        Also the case of a rollout assigning a bundle the device already has (from
        an earlier rollout, or switched off by a kill): no download, one ACTIVE.
        """
        reached = self.features.reached(a)
        if not current.active:
            if not await self._blocking(current.intact):
                await self._fail(a, "INSTALL_FAILED", "the kept bundle is damaged; not reactivated")
                return
            self.features.set_active(a.feature, True)
        if reached is not None and not reached_at_least(reached, "INSTALLED"):
            await self.report(a, "INSTALLED")  # our install, interrupted before saying so
        await self.report(a, "ACTIVE", health=self._health_sample(a))
        self.features.settle(a)
        await self._save()

    def _draw_crash(self, version: str) -> int:
        rate = self.health.crash_rate(self.profile.model, version)
        # No draw without a crash rate: the failure draws of seeded fleets stay as they were.
        return 1 if rate and self.rng.random() < rate else 0

    def _draw_uses(self, version: str) -> int:
        """How often the feature was used since the last sample (its scenario's rate)."""
        rate = self.health.use_rate(self.profile.model, version)
        # No draw without a rate, so seeded fleets without usage draw as before.
        return 1 + self.rng.randrange(5) if rate and self.rng.random() < rate else 0

    def _health_sample(self, a: common_pb2.FeatureAssignment) -> common_pb2.HealthSample:
        """The first health sample, sent with ACTIVE: did the feature crash on start?"""
        crashes = self._draw_crash(a.version)
        health = common_pb2.HealthSample(
            crash_count=crashes, feature_error_count=crashes, uptime_seconds=0
        )
        if a.rollout_id:
            r = self.record
            r.health_samples[a.rollout_id] = r.health_samples.get(a.rollout_id, 0) + 1
            r.crashes[a.rollout_id] = r.crashes.get(a.rollout_id, 0) + crashes
        return health

    async def _sample_health(self) -> None:
        """While connected, send a health sample every `health_interval` seconds.

        One per feature the device runs (its event names the feature and version
        running, in state ACTIVE, or DEACTIVATED when switched off), or one with no
        feature when it runs none. The samples name no rollout: the control plane
        attributes them, to the rollout that exposed the device or to the rollout
        whose holdout it is in, so a device never needs to know it is held out.
        """
        started = self.clock.now()
        while True:
            await asyncio.sleep(self.health_interval * (0.5 + self.rng.random()))
            if not self.connected.is_set():
                continue
            uptime = int((self.clock.now() - started).total_seconds())
            running = sorted(self.installed.items())
            targets = [(name, b.version, b.sha256, b.active) for name, b in running] or [
                ("", "", b"", True)
            ]
            for feature, version, sha256, active in targets:
                crashes = self._draw_crash(version) if active else 0
                uses = self._draw_uses(version) if active and feature else 0
                key = f"{feature}@{version}" if feature else ""
                r = self.record
                r.periodic_samples[key] = r.periodic_samples.get(key, 0) + 1
                r.periodic_crashes[key] = r.periodic_crashes.get(key, 0) + crashes
                try:
                    await self.report(
                        common_pb2.FeatureAssignment(
                            feature=feature, version=version, sha256=sha256
                        ),
                        "ACTIVE" if active else "DEACTIVATED",
                        health=common_pb2.HealthSample(
                            crash_count=crashes,
                            feature_error_count=crashes,
                            uptime_seconds=max(uptime, 0),
                            uses=uses,
                        ),
                    )
                    if uses:  # counted once the broker took it, as the control plane sees it
                        r.periodic_samples_used[key] = r.periodic_samples_used.get(key, 0) + 1
                        r.periodic_uses[key] = r.periodic_uses.get(key, 0) + uses
                except MqttError:
                    break  # the session is going; the next one samples again

    async def _deactivate(
        self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None
    ) -> None:
        if current is None or not current.active:
            return
        self.features.set_active(a.feature, False)
        self.features.settle(a)
        await self._save()
        await self.report(a, "DEACTIVATED")

    async def _revert(
        self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None
    ) -> None:
        """A signed revert: back to exactly the bundle this device ran before, no download."""
        good = self.features.last_known_good.get(a.feature)
        if a.active and good is not None and good.sha256 == a.sha256:
            if not await self._blocking(good.intact):
                await self._fail(
                    a, "INSTALL_FAILED", "the last-known-good bundle on disk is damaged"
                )
                return
            self.features.revert_to_last_known_good(a.feature)
        elif a.active and current is not None and current.sha256 == a.sha256:
            if not current.active:  # the new bundle never replaced it: already there
                self.features.set_active(a.feature, True)
        elif a.active:
            await self._fail(
                a,
                "ROLLBACK_REFUSED",
                f"revert to {a.feature} {a.version}, which is not this device's last-known-good",
            )
            return
        elif current is not None and current.active:
            self.features.set_active(a.feature, False)
        self.features.settle(a)
        await self._save()
        await self.report(a, "ROLLED_BACK")

    async def _fail(self, a: common_pb2.FeatureAssignment, reason: str, detail: str) -> None:
        changed = self.features.abandon(a.feature)
        if reason in FINAL_REASONS:
            self.features.settle(a)
            changed = True
        if changed:
            await self._save()
        await self.report(a, "FAILED", reason=reason, detail=detail)

    async def _save(self) -> None:
        await self._blocking(self.features.save)

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
        self,
        a: common_pb2.FeatureAssignment,
        state: str,
        *,
        reason: str = "",
        detail: str = "",
        health: common_pb2.HealthSample | None = None,
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
            health=health,
        )
        assert self._client is not None
        payload = event.SerializeToString()
        # Raises if the broker connection is lost: the event is not counted as sent, and
        # the next session resumes the work and reports the step again (a new seq).
        await self._publish_event(payload)
        if a.rollout_id:
            # The control plane's rule (`ota.domain.progress`): a refusal after the
            # device settled is a reason, not a lost install; giving up on an
            # unreachable control plane is a wait, not a failure.
            before = Standing(
                self.record.last_state.get(a.rollout_id, "TARGETED"),
                self.record.failed_reason.get(a.rollout_id, ""),
            )
            after = advance(before, state, reason)
            self.record.last_state[a.rollout_id] = after.state
            self.record.last_reason[a.rollout_id] = reason
            self.record.states_seen.setdefault(a.rollout_id, set()).add(state)
            sent = self.record.events_by_rollout
            sent[a.rollout_id] = sent.get(a.rollout_id, 0) + 1
            if after.failure:
                self.record.failed_reason[a.rollout_id] = after.failure
            if is_waiting(reason):
                self.record.gave_up[a.rollout_id] = self.record.gave_up.get(a.rollout_id, 0) + 1
        self.record.events_sent += 1
        if self.duplicate_every and seq % self.duplicate_every == 0:
            self.record.duplicates_sent += 1
            await self._client.publish(self.topics.events(self.device_id), payload, qos=1)

    async def _publish_event(self, payload: bytes) -> None:
        """Publish an event until the broker delivers it to a subscriber.

        A PUBACK saying "no matching subscribers" means nobody got it (the broker
        restarted and the control plane is not back yet): the same event, same
        seq, goes again after a pause; ingest stores it once.
        """
        assert self._client is not None
        delay = 0.2
        while True:
            if await self._client.publish_routed(self.topics.events(self.device_id), payload):
                return
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, 5.0)

    async def go_offline(self) -> None:
        """Say goodbye the way firmware shutting down does: retained `online=false`."""
        if self._client is not None:
            await self._client.publish(
                self.topics.state(self.device_id),
                self._reported(online=False),
                qos=1,
                retain=True,
            )
        self.connected.clear()

    def _reported(self, *, online: bool) -> bytes:
        now = Timestamp()
        now.FromDatetime(self.clock.now())
        return common_pb2.ReportedState(
            device_id=self.device_id,
            online=online,
            generation=self.trust.accepted_generation,
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
