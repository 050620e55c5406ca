"""A simulated device on its own disk: restarts, power cuts, downgrades and reverts.

No broker and no server: the device's MQTT client is a recorder and its
`MetadataSource` an in-memory TUF repository built here with python-tuf (with
the director key in the root, as the project's roots have it). Everything the
device decides runs as in production: `DeviceTrust`, the state on disk, the
event numbering.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from device_sim.device import PowerCut, SimDevice
from device_sim.profile import ClockSkew, DeviceProfile, FailureProfile, SkewedClock
from ota.clock import Clock, ManualClock
from ota.device.envelope import DIRECTOR_FIELD
from ota.device.state import STATE_FILE, InstalledFeatures
from ota.device.trust import DeviceTrust, RetryPolicy
from ota.errors import InvalidArgument
from ota.transport.topics import Topics
from ota.trust.director import Director
from ota.v1 import common_pb2

NOW = datetime(2026, 3, 1, tzinfo=UTC)
DEVICE = "car-1"
FEATURE = "nav"


def bundle(version: str, size: int = 5000) -> bytes:
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class Repository:
    """A TUF image repository in memory (consistent snapshots), plus the director key."""

    def __init__(self) -> None:
        self.keys = {
            role: CryptoSigner.generate_ed25519()
            for role in ("root", "targets", "snapshot", "timestamp", "director")
        }
        root = Root(expires=NOW + timedelta(days=365), consistent_snapshot=True)
        for role in ("root", "targets", "snapshot", "timestamp"):
            root.add_key(self.keys[role].public_key, role)
        director = self.keys["director"].public_key
        root.keys[director.keyid] = director
        root.unrecognized_fields[DIRECTOR_FIELD] = {"keyids": [director.keyid], "threshold": 1}
        self.files: dict[tuple[str, int], bytes] = {}
        self.root = self._signed("root", root)
        self.targets = Targets(expires=NOW + timedelta(days=90))
        self.blobs: dict[str, bytes] = {}
        self._versions = {"snapshot": 0, "timestamp": 0}
        self._publish()

    def publish(
        self, version: str, *, models: tuple[str, ...] = ("ev6",)
    ) -> common_pb2.FeatureAssignment:
        data = bundle(version)
        path = f"features/{FEATURE}/{version}.bundle"
        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields["custom"] = {
            "feature": FEATURE,
            "version": version,
            "models": list(models),
        }
        self.targets.targets[path] = info
        self.targets.version += 1
        self.blobs[path] = data
        self._publish()
        return common_pb2.FeatureAssignment(
            feature=FEATURE,
            version=version,
            target_path=path,
            sha256=hashlib.sha256(data).digest(),
            length=len(data),
            active=True,
        )

    def metadata(self, role: str, version: int | None) -> bytes | None:
        if version is None:
            versions = [v for (r, v) in self.files if r == role]
            return self.files[(role, max(versions))] if versions else None
        return self.files.get((role, version))

    def _publish(self) -> None:
        self._signed("targets", self.targets)
        self._versions["snapshot"] += 1
        snapshot = Snapshot(version=self._versions["snapshot"], expires=NOW + timedelta(days=7))
        snapshot.meta["targets.json"] = MetaFile(version=self.targets.version)
        self._signed("snapshot", snapshot)
        self._versions["timestamp"] += 1
        timestamp = Timestamp(
            version=self._versions["timestamp"],
            expires=NOW + timedelta(days=1),
            snapshot_meta=MetaFile(version=snapshot.version),
        )
        self._signed("timestamp", timestamp)

    def _signed(self, role: str, signed: Any) -> bytes:
        md = Metadata(signed)
        md.sign(self.keys[role])
        data = md.to_bytes()
        self.files[(role, signed.version)] = data
        return data


class Source:
    """The device's link to the control plane; it can cut streams and count calls."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.target_calls: list[tuple[str, int]] = []
        self.cuts: list[int] = []  # the next calls break after this many bytes each
        self.metadata_failures = 0  # the next metadata calls fail
        self.failure: Exception | None = None  # every target call fails with this
        self.endless = False

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        if self.metadata_failures:
            self.metadata_failures -= 1
            raise ConnectionError("metadata link down")
        return self.repo.metadata(role, version)

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        self.target_calls.append((target_path, offset))
        if self.failure is not None:
            raise self.failure
        data = self.repo.blobs[target_path]
        end = len(data) if self.endless else offset + max_length
        cut = self.cuts.pop(0) if self.cuts else None
        sent = 0
        for start in range(offset, min(end, len(data)), 512):
            piece = data[start : min(start + 512, end)]
            if cut is not None and sent + len(piece) > cut:
                if cut > sent:
                    yield piece[: cut - sent]
                raise ConnectionResetError(f"stream cut after {cut} bytes")
            sent += len(piece)
            yield piece
        if cut is not None:
            raise ConnectionResetError(f"connection reset after the last of {sent} bytes")
        while self.endless:
            yield b"\x00" * 512


class Wire:
    """Stands in for the device's MQTT client: records what it publishes."""

    def __init__(self) -> None:
        self.events: list[common_pb2.DeviceEvent] = []
        self.states: list[common_pb2.ReportedState] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if topic.endswith("/events"):
            self.events.append(common_pb2.DeviceEvent.FromString(payload))
        else:
            self.states.append(common_pb2.ReportedState.FromString(payload))

    async def publish_routed(self, topic: str, payload: bytes) -> bool:
        await self.publish(topic, payload, qos=1)
        return True

    def steps(self, rollout_id: str | None = None) -> list[str]:
        return [
            common_pb2.DeviceState.Name(e.state)
            for e in self.events
            if rollout_id is None or e.rollout_id == rollout_id
        ]

    def failures(self) -> list[tuple[str, str]]:
        return [
            (e.rollout_id, common_pb2.FailureReason.Name(e.error_code))
            for e in self.events
            if e.state == common_pb2.FAILED
        ]


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.state_dir = tmp_path / DEVICE
        self.clock = ManualClock(NOW)
        self.repo = Repository()
        self.source = Source(self.repo)
        self.director = Director(self.keys("director"))
        self.generation = 0
        self.sleeps: list[float] = []
        # Monotonic seconds for the retry policy, advanced by each (simulated) pause;
        # `on_sleep` sees the total, e.g. to end an outage after a while.
        self.monotonic = 0.0
        self.on_sleep: Callable[[float], None] | None = None
        self.wire = Wire()
        self._executor = ThreadPoolExecutor(1)

    def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.monotonic += seconds
        if self.on_sleep is not None:
            self.on_sleep(self.monotonic)

    def keys(self, role: str) -> CryptoSigner:
        return self.repo.keys[role]

    def boot(
        self,
        *,
        crash: Callable[[common_pb2.FeatureAssignment], bool] | None = None,
        clock: Clock | None = None,
        attempts: int = 3,
        unreachable_for: float = 60.0,
    ) -> SimDevice:
        """A device (re)started on the same state directory."""
        clock = clock or self.clock
        trust = DeviceTrust(
            device_id=DEVICE,
            model="ev6",
            firmware="4.2.0",
            state_dir=self.state_dir,
            trusted_root=self.repo.root,
            source=self.source,
            clock=clock,
            retry=RetryPolicy(
                attempts=attempts,
                first_delay=0.1,
                max_delay=2.0,
                unreachable_for=unreachable_for,
                sleep=self._sleep,
                clock=lambda: self.monotonic,
            ),
            durable=False,
        )
        device = SimDevice(
            DeviceProfile(DEVICE, "ev6", "eu", "4.2.0"),
            secret="secret",
            trust=trust,
            topics=Topics(),
            failures=FailureProfile(),
            executor=self._executor,
            rng=random.Random(7),
            clock=clock,
            seq_file=self.state_dir / "event-seq",
            features=InstalledFeatures.load(self.state_dir / STATE_FILE, durable=False),
            crash_after_download=crash,
        )
        device._client = self.wire  # type: ignore[assignment]
        return device

    def desired(
        self, *features: common_pb2.FeatureAssignment, generation: int | None = None
    ) -> bytes:
        if generation is None:
            self.generation += 1
            generation = self.generation
        state = common_pb2.DesiredState(device_id=DEVICE, generation=generation, features=features)
        state.issued_at.FromDatetime(self.clock.now())
        state.expires_at.FromDatetime(self.clock.now() + timedelta(days=7))
        return self.director.sign(state).SerializeToString()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def assigned(
    a: common_pb2.FeatureAssignment, rollout_id: str, *, revert: bool = False
) -> common_pb2.FeatureAssignment:
    out = common_pb2.FeatureAssignment()
    out.CopyFrom(a)
    out.rollout_id, out.revert = rollout_id, revert
    return out


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def deliver(device: SimDevice, envelope: bytes) -> None:
    asyncio.run(device.on_desired(envelope))


def running(device: SimDevice) -> tuple[str, bool] | None:
    b = device.installed.get(FEATURE)
    return (b.version, b.active) if b is not None else None


ALL_STEPS = [
    "NOTIFIED",
    "DOWNLOADING",
    "DOWNLOADED",
    "VERIFIED",
    "INSTALLING",
    "INSTALLED",
    "ACTIVE",
]


# -- installing and restarting -------------------------------------------------------


def test_an_install_is_reported_step_by_step_and_survives_a_restart(world: World) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    device = world.boot()
    deliver(device, world.desired(v1))
    assert world.wire.steps("r-1") == ALL_STEPS
    assert running(device) == ("1.0", True)
    kept = device.installed[FEATURE].file
    assert kept.read_bytes() == bundle("1.0")

    again = world.boot()
    asyncio.run(again.resume())

    assert again.installed == device.installed
    assert world.wire.steps("r-1") == ALL_STEPS  # nothing new to do, nothing reported
    assert len(world.source.target_calls) == 1
    # A renewed copy of the same desired state (new generation) changes nothing either.
    deliver(again, world.desired(v1))
    assert world.wire.steps("r-1") == ALL_STEPS
    assert world.wire.states[-1].generation == 2


def test_a_device_killed_between_download_and_install_resumes_and_reports_once(
    world: World,
) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    device = world.boot(crash=lambda a: a.version == "1.0")
    with pytest.raises(PowerCut):
        deliver(device, world.desired(v1))
    assert world.wire.steps("r-1") == ALL_STEPS[:4]
    assert FEATURE not in device.installed
    calls = list(world.source.target_calls)

    rebooted = world.boot()
    asyncio.run(rebooted.resume())

    assert world.wire.steps("r-1") == ALL_STEPS  # each step exactly once
    assert running(rebooted) == ("1.0", True)
    assert world.source.target_calls == calls  # re-verified from disk, not downloaded
    seqs = [e.seq for e in world.wire.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_kept_download_damaged_while_the_device_was_off_is_fetched_again(
    world: World,
) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    with pytest.raises(PowerCut):
        deliver(world.boot(crash=lambda a: True), world.desired(v1))
    kept = next((world.state_dir / "downloads").iterdir())
    kept.write_bytes(b"\x00" + kept.read_bytes()[1:])

    rebooted = world.boot()
    asyncio.run(rebooted.resume())

    assert running(rebooted) == ("1.0", True)
    assert rebooted.installed[FEATURE].file.read_bytes() == bundle("1.0")
    assert len(world.source.target_calls) == 2  # the damaged copy did not pass verification
    assert world.wire.steps("r-1") == ALL_STEPS


def test_an_expired_accepted_state_is_not_resumed(world: World) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    with pytest.raises(PowerCut):
        deliver(world.boot(crash=lambda a: True), world.desired(v1))
    world.clock.advance(timedelta(days=8))

    rebooted = world.boot()
    asyncio.run(rebooted.resume())

    assert FEATURE not in rebooted.installed
    assert world.wire.steps("r-1") == ALL_STEPS[:4]


# -- versions only go up, except a signed revert to the device's own LKG ---------------


def test_an_older_version_is_refused_and_nothing_changes(world: World) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0")
    device = world.boot()
    deliver(device, world.desired(assigned(v2, "r-2")))
    downloads_before = sorted((world.state_dir / "downloads").iterdir())
    calls = len(world.source.target_calls)

    deliver(device, world.desired(assigned(v1, "r-old")))

    assert world.wire.steps("r-old") == ["NOTIFIED", "FAILED"]
    assert world.wire.failures() == [("r-old", "ROLLBACK_REFUSED")]
    assert running(device) == ("2.0", True)
    assert len(world.source.target_calls) == calls
    assert sorted((world.state_dir / "downloads").iterdir()) == downloads_before
    on_disk = InstalledFeatures.load(world.state_dir / STATE_FILE)
    assert (on_disk.installed, on_disk.last_known_good) == (device.installed, {})
    # Renewed, the same refused order is not refused (or reported) again, even after a restart.
    deliver(device, world.desired(assigned(v1, "r-old")))
    rebooted = world.boot()
    asyncio.run(rebooted.resume())
    assert world.wire.failures() == [("r-old", "ROLLBACK_REFUSED")]


def test_a_signed_revert_reactivates_the_last_known_good_without_a_download(
    world: World,
) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0")
    device = world.boot()
    deliver(device, world.desired(assigned(v1, "r-1")))
    deliver(device, world.desired(assigned(v2, "r-2")))
    assert device.last_known_good[FEATURE].version == "1.0"
    calls = len(world.source.target_calls)

    revert = assigned(v1, "r-2", revert=True)
    deliver(device, world.desired(revert))

    assert running(device) == ("1.0", True)
    assert len(world.source.target_calls) == calls
    assert world.wire.steps("r-2")[-1] == "ROLLED_BACK"
    assert device.installed[FEATURE].file.read_bytes() == bundle("1.0")
    # The 2.0 file is gone; a renewed revert does nothing, even after a restart.
    assert [p.name for p in (world.state_dir / "downloads").iterdir()] == [
        "features%2Fnav%2F1.0.bundle"
    ]
    deliver(device, world.desired(revert))
    rebooted = world.boot()
    asyncio.run(rebooted.resume())
    assert world.wire.steps("r-2").count("ROLLED_BACK") == 1
    assert running(rebooted) == ("1.0", True)


def test_a_revert_to_anything_but_the_last_known_good_is_refused(world: World) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0")
    v3 = world.repo.publish("3.0")
    device = world.boot()
    deliver(device, world.desired(assigned(v2, "r-2")))
    deliver(device, world.desired(assigned(v3, "r-3")))

    deliver(device, world.desired(assigned(v1, "r-3", revert=True)))

    assert world.wire.failures() == [("r-3", "ROLLBACK_REFUSED")]
    assert running(device) == ("3.0", True)


def test_a_damaged_last_known_good_is_not_reactivated(world: World) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0")
    device = world.boot()
    deliver(device, world.desired(assigned(v1, "r-1")))
    deliver(device, world.desired(assigned(v2, "r-2")))
    device.last_known_good[FEATURE].file.write_bytes(b"rotten")

    deliver(device, world.desired(assigned(v1, "r-2", revert=True)))

    assert world.wire.failures() == [("r-2", "INSTALL_FAILED")]
    assert running(device) == ("2.0", True)


def test_a_revert_when_the_new_bundle_never_replaced_the_old_one(world: World) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0", models=("ev9",))  # this device cannot take it
    device = world.boot()
    deliver(device, world.desired(assigned(v1, "r-1")))
    deliver(device, world.desired(assigned(v2, "r-2")))
    assert world.wire.failures() == [("r-2", "INCOMPATIBLE")]

    deliver(device, world.desired(assigned(v1, "r-2", revert=True)))

    assert world.wire.steps("r-2")[-1] == "ROLLED_BACK"
    assert running(device) == ("1.0", True)


def test_deactivate_and_reactivate_without_a_download(world: World) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    device = world.boot()
    deliver(device, world.desired(v1))
    off = assigned(v1, "r-kill")
    off.active = False
    deliver(device, world.desired(off))
    assert running(device) == ("1.0", False)
    calls = len(world.source.target_calls)

    deliver(device, world.desired(assigned(v1, "r-again")))

    assert running(device) == ("1.0", True)
    assert world.wire.steps("r-again") == ["ACTIVE"]
    assert len(world.source.target_calls) == calls


def test_a_rollout_of_the_bundle_a_device_already_runs_is_reported_active_once(
    world: World,
) -> None:
    v1 = world.repo.publish("1.0")
    device = world.boot()
    deliver(device, world.desired(assigned(v1, "r-1")))

    deliver(device, world.desired(assigned(v1, "r-2")))
    deliver(device, world.desired(assigned(v1, "r-2")))  # renewed

    assert world.wire.steps("r-2") == ["ACTIVE"]
    assert len(world.source.target_calls) == 1


# -- replays and clocks ----------------------------------------------------------------


def test_a_replayed_older_desired_state_is_reported_and_a_duplicate_is_not(
    world: World,
) -> None:
    v1 = world.repo.publish("1.0")
    v2 = world.repo.publish("2.0")
    device = world.boot()
    old = world.desired(assigned(v1, "r-1"))
    deliver(device, old)
    current = world.desired(assigned(v2, "r-2"))
    deliver(device, current)

    deliver(device, current)  # the retained copy, again: nothing to say
    assert world.wire.failures() == []
    deliver(device, old)  # genuine but older: a replay

    assert world.wire.failures() == [("r-1", "ROLLBACK_REFUSED")]
    assert running(device) == ("2.0", True)


@pytest.mark.parametrize(
    ("skew", "reason"),
    [(timedelta(hours=-6), "CLOCK_INVALID"), (timedelta(days=30), "METADATA_EXPIRED")],
)
def test_a_device_clock_far_off_is_reported_against_the_rollout(
    world: World, skew: timedelta, reason: str
) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    device = world.boot(clock=SkewedClock(world.clock, skew))

    deliver(device, world.desired(v1))

    assert world.wire.failures() == [("r-1", reason)]
    assert FEATURE not in device.installed
    assert device.trust.accepted_generation == 0


# -- delivery ---------------------------------------------------------------------------


def test_a_download_cut_twice_resumes_from_the_last_byte(world: World) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    world.source.cuts = [1300, 700]
    device = world.boot()

    deliver(device, world.desired(v1))

    assert running(device) == ("1.0", True)
    assert [offset for _, offset in world.source.target_calls] == [0, 1300, 2000]
    assert len(world.sleeps) == 2 and world.sleeps[1] > world.sleeps[0] / 2


def test_a_download_that_keeps_breaking_gives_up_then_a_later_state_retries(
    world: World,
) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    world.source.failure = ValueError("garbled stream")  # the server answers, badly
    device = world.boot(attempts=4)

    deliver(device, world.desired(v1))

    assert world.wire.failures() == [("r-1", "DOWNLOAD_FAILED")]
    assert len(world.source.target_calls) == 4
    assert len(world.sleeps) == 3
    assert FEATURE not in device.installed

    world.source.failure = None
    deliver(device, world.desired(v1))  # renewed: a transient failure is tried again
    assert running(device) == ("1.0", True)


def test_an_unreachable_control_plane_is_waited_out_without_a_word(world: World) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    world.source.failure = ConnectionRefusedError("control plane restarting")
    device = world.boot(attempts=3, unreachable_for=60.0)

    def back_after_40s(now: float) -> None:
        if now >= 40.0:
            world.source.failure = None

    world.on_sleep = back_after_40s
    deliver(device, world.desired(v1))

    assert running(device) == ("1.0", True)
    assert world.wire.failures() == []
    assert device.record.last_state["r-1"] == "ACTIVE"
    assert len(world.source.target_calls) > 3  # far more than the attempts of a broken one
    assert max(world.sleeps) <= 2.0


def test_a_device_that_gives_up_on_the_control_plane_says_so_once_and_keeps_trying(
    world: World,
) -> None:
    v1 = assigned(world.repo.publish("1.0"), "r-1")
    world.source.failure = ConnectionResetError("connection reset")
    device = world.boot(unreachable_for=10.0)

    def back_after_25s(now: float) -> None:
        if now >= 25.0:
            world.source.failure = None

    world.on_sleep = back_after_25s
    deliver(device, world.desired(v1))

    assert world.wire.failures() == [("r-1", "CONTROL_PLANE_UNREACHABLE")]
    assert running(device) == ("1.0", True)
    # The same rule as the control plane's: a wait, not a failure.
    assert device.record.last_state["r-1"] == "ACTIVE"
    assert device.record.gave_up == {"r-1": 1}
    assert "r-1" not in device.record.failed_reason


def test_clock_skew_by_device_pattern() -> None:
    skew = ClockSkew.parse(["car-[12]=-7200", "car-*=30.5"])
    assert skew("car-1") == timedelta(hours=-2)
    assert skew("car-3") == timedelta(seconds=30.5)
    assert skew("truck-1") == timedelta(0)
    for bad in ["car-1", "=5", "car-1=soon"]:
        with pytest.raises(InvalidArgument):
            ClockSkew.parse([bad])
    clock = SkewedClock(ManualClock(NOW), timedelta(minutes=-5))
    assert clock.now() == NOW - timedelta(minutes=5)
