"""Helpers for the attack tests: a small real system, and the attacker's hands on it.

`arena()` starts what `tests/e2e/test_attacks.py` attacks: a private Mosquitto
(`attack_broker`: the project's generated config, as in `tests/conftest.py`), a
control plane on a real gRPC port over SQLite, and a few simulated devices,
optionally on clocks the test moves. The attacker works on the same real parts:

- the broker, as a user allowed to publish desired states (`Arena.deliver`);
- a stolen control plane: its disk (`Arena.blob`), its database
  (`Arena.overwrite_tuf_row`, `Arena.register_as`, `smuggle_bundle`) and its
  online snapshot, timestamp and director keys, never a release or root key.

Checks: `snapshots` / `assert_unchanged` (what a device runs and has accepted),
`trusted_metadata` and `kept_files` (what it trusts and keeps on disk), and
`refusals` (the report, the stored FAILED events and the devices agree on why).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from securesystemslib.signer import Signer  # type: ignore[attr-defined, unused-ignore]
from sqlmodel import col, select
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp  # type: ignore[attr-defined, unused-ignore]

from device_sim.device import SimDevice
from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.broker import BrokerSettings
from ota.client import Client
from ota.clock import Clock, SystemClock
from ota.devstack import DevStack
from ota.keyring import generate_keyring
from ota.signing.keys import load_signer, sign_metadata
from ota.signing.release import add_target, target_path_for
from ota.store import bundles, desired
from ota.store.bundles import SqlMetadataStore
from ota.store.ingest import drop_counts
from ota.store.models import DeviceEventRow, DeviceRow, PendingBundleRow, TufMetadataRow
from ota.transport.topics import Topics
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2, report_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle, private_broker
from tests.conftest import endpoint
from tests.e2e.scenario import MODELS, REGIONS, report, run_rollout, wait_for

FEATURE = "lane-assist"
# A broker user with the control plane's ACL (it may publish desired states), not
# the control plane's own: with use_username_as_clientid, connecting as that user
# would take over the control plane's session.
ATTACKER = "ota-attacker"


def bundle_bytes(version: str, size: int = 10_000) -> bytes:
    """Deterministic bundle contents, different for every version."""
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass(frozen=True)
class Release:
    """A bundle every device installed, and the rollout that installed it."""

    sha256: str
    rollout_id: str


@dataclass
class Arena:
    """One running system under attack, and the attacker's access to it."""

    tmp_path: Path
    broker: BrokerHandle
    stack: DevStack
    fleet: SimulatedFleet
    client: Client
    attacker_secret: str

    # -- the fleet ----------------------------------------------------------------------

    @property
    def devices(self) -> list[SimDevice]:
        return self.fleet.devices

    def device(self, model: str) -> SimDevice:
        """The first device of `model`."""
        return next(d for d in self.devices if d.profile.model == model)

    def device_dir(self, device: SimDevice) -> Path:
        """Where the device keeps its state (trusted metadata under ``tuf/``)."""
        return self.fleet.settings.state_dir / device.device_id

    # -- the honest operator and release engineers --------------------------------------

    def publish(
        self,
        version: str,
        *,
        keys: Sequence[Path] | None = None,
        models: Sequence[str] = MODELS,
    ) -> bundle_pb2.Bundle:
        """Publish a bundle as a release engineer does (`ota bundle publish`)."""
        path = self.tmp_path / f"bundle-{version}.bin"
        path.write_bytes(bundle_bytes(version))
        published = self.client.publish_bundle(
            path,
            feature=FEATURE,
            version=version,
            models=list(models),
            min_firmware="4.0",
            keys=list(keys or self.stack.keys.release_keys),
        )
        return published

    def roll_out(self, version: str) -> rollout_pb2.Rollout:
        """One stage to the whole fleet; returns the rollout once it stopped moving."""
        return run_rollout(self.client, version, [1_000_000], timeout=60)

    def install(self, version: str, *, keys: Sequence[Path] | None = None) -> Release:
        """Publish and roll out `version`; every device ends ACTIVE on it."""
        sha = self.publish(version, keys=keys).sha256.hex()
        rollout = self.roll_out(version)
        assert rollout.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, rollout.state_reason
        wait_for(
            lambda: all(
                FEATURE in d.installed and d.installed[FEATURE].sha256.hex() == sha
                for d in self.devices
            ),
            what=f"every device to run {version}",
            timeout=30,
        )
        return Release(sha, rollout.rollout_id)

    def report(self, rollout_id: str) -> report_pb2.RolloutReport:
        return report(self.client, rollout_id)

    # -- the attacker's access ----------------------------------------------------------

    @property
    def topics(self) -> Topics:
        return Topics(self.stack.control_plane.config.topic_root)

    def envelope(self, device: SimDevice) -> bytes:
        """The device's current signed desired state, as the control plane stored it."""
        with self.stack.control_plane.store.transaction() as session:
            envelope = desired.get_envelope(session, device.device_id)
        assert envelope is not None, f"{device.device_id} has no desired state"
        return envelope

    def deliver(self, device: SimDevice | str, payload: bytes, *, retain: bool = True) -> None:
        """Publish `payload` on a device's desired topic, where the device takes it from."""
        device_id = device if isinstance(device, str) else device.device_id
        with self.broker.client(ATTACKER, self.attacker_secret) as mqtt:
            mqtt.connect_ok()
            reason = mqtt.publish(self.topics.desired(device_id), payload, retain=retain)
            assert not reason.is_failure, reason

    def register(self, device_id: str, model: str = "ev6") -> str:
        """Provision one more device through FleetService; returns its secret."""
        response = self.client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=device_id, model=model, region="eu", firmware="4.2.0"
                    )
                ]
            ),
            metadata=self.client.metadata,
        )
        return str(response.credentials[0].secret)

    def drops(self) -> dict[str, int]:
        """Device messages the control plane acknowledged and dropped, by reason."""
        with self.stack.control_plane.store.transaction() as session:
            return drop_counts(session)

    def pending_targets(self, version: str) -> bytes:
        """The targets metadata a pending publication waits on, with its signatures so far."""
        pending = self.client.bundles.GetPendingTargets(
            bundle_pb2.GetPendingTargetsRequest(name=bundles.bundle_name(FEATURE, version)),
            metadata=self.client.metadata,
        )
        return bytes(pending.signed_targets)

    def blob(self, bundle: bundle_pb2.Bundle) -> Path:
        """Where the control plane keeps the bytes it streams for this bundle."""
        path = self.stack.control_plane.config.data_dir / "blobs" / bundle.sha256.hex()
        assert path.is_file(), path
        return path

    @property
    def metadata_store(self) -> SqlMetadataStore:
        return SqlMetadataStore(self.stack.control_plane.store)

    def tuf_row(self, role: str, version: int | None = None) -> bytes:
        """Stored metadata of `role` (the newest version if None)."""
        data = self.metadata_store.get_metadata(role, version)
        assert data is not None, (role, version)
        return data

    def overwrite_tuf_row(self, role: str, version: int, content: bytes) -> None:
        """Make the repository serve `content` as `role` version `version`."""
        with self.stack.control_plane.store.transaction() as session:
            row = session.get(TufMetadataRow, (role, version))
            assert row is not None, (role, version)
            row.content = content
            session.add(row)

    def latest_version(self, role: str) -> int:
        """The highest stored version of `role`."""
        with self.stack.control_plane.store.transaction() as session:
            versions = session.exec(
                select(TufMetadataRow.version).where(TufMetadataRow.role == role)
            ).all()
        return max(versions)

    def register_as(self, device: SimDevice, model: str) -> None:
        """Change the model the control plane's registry holds for a device."""
        with self.stack.control_plane.store.transaction() as session:
            row = session.get(DeviceRow, device.device_id)
            assert row is not None
            row.model = model
            session.add(row)


@contextmanager
def attack_broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    """The private broker of `tests/conftest.py`, plus the `ATTACKER` control user."""
    settings = BrokerSettings(port=0, extra_control_usernames=(ATTACKER,))
    with private_broker(tmp_path / "broker", settings=settings) as handle:
        yield handle


@contextmanager
def arena(
    tmp_path: Path,
    broker: BrokerHandle,
    *,
    devices: int = 3,
    control_clock: Clock | None = None,
    device_clock: Clock | None = None,
    release_keys: int = 1,
    release_threshold: int = 1,
) -> Iterator[Arena]:
    """A control plane on `broker` (an `attack_broker`), and `devices` simulated devices.

    Device models cycle through ev6, ev9, niro. Every bundle needs
    `release_threshold` of the `release_keys` release keys.
    """
    attacker_secret = broker.add_user(ATTACKER)
    generate_keyring(
        tmp_path / "stack" / "keys",
        release_keys=release_keys,
        release_threshold=release_threshold,
    )
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker), clock=control_clock)
    fleet: SimulatedFleet | None = None
    client = Client.connect(stack.server, stack.admin_token)
    try:
        fleet = SimulatedFleet(
            compose_fleet(devices, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            FleetSettings(
                server=stack.server,
                admin_token=stack.admin_token,
                trusted_root=stack.keys.root_json.read_bytes(),
                state_dir=tmp_path / "devices",
                failures=FailureProfile.parse([]),
            ),
            clock=device_clock,
        )
        fleet.start()
        yield Arena(tmp_path, broker, stack, fleet, client, attacker_secret)
    finally:
        client.close()
        if fleet is not None:
            fleet.stop()
        stack.stop()


# -- a stolen control plane ---------------------------------------------------------------


def release_targets(arena: Arena, version: str, signers: Sequence[Signer]) -> bytes:
    """The next targets metadata adding `version`, signed by `signers`, as the CLI makes it."""
    data = bundle_bytes(version)
    return add_target(
        arena.tuf_row("targets"),
        target_path=target_path_for(FEATURE, version),
        length=len(data),
        sha256_hex=_sha(data),
        custom={"feature": FEATURE, "version": version, "models": list(MODELS)},
        signers=list(signers),
        expires=SystemClock().now() + timedelta(days=30),
    )


def edit_signatures(targets: bytes, edit: Callable[[list[dict[str, str]]], object]) -> bytes:
    """Signed metadata with its signature list edited in place by `edit` (signed part kept)."""
    doc = json.loads(targets)
    edit(doc["signatures"])
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def forge(signatures: list[dict[str, str]]) -> None:
    """Replace every signature's bytes with bytes the forger made up (keyids kept)."""
    for sig in signatures:
        sig["sig"] = bytes(len(sig["sig"]) // 2).hex()


def smuggle_bundle(arena: Arena, version: str, targets: bytes) -> str:
    """Make `version` visible to devices under `targets`, bypassing every release check.

    What a thief with the control plane's database, disk and online keys can do:
    store the bytes, serve `targets` (signed by whoever it was) as the newest
    targets metadata with a snapshot and timestamp over it re-signed by the real
    online keys, and turn the bundle into one a rollout can name (a pending
    publication is forced through). Returns the bundle's sha256 hex.
    """
    data = bundle_bytes(version)
    sha = _sha(data)
    (arena.stack.control_plane.config.data_dir / "blobs" / sha).write_bytes(data)
    targets_version = int(json.loads(targets)["signed"]["version"])
    arena.metadata_store.put_metadata("targets", targets_version, targets)
    _resign_snapshot_and_timestamp(arena, targets_version, targets, SystemClock().now())
    name = bundles.bundle_name(FEATURE, version)
    with arena.stack.control_plane.store.transaction() as session:
        pending = session.get(PendingBundleRow, name)
        if pending is not None:
            session.delete(pending)
            session.flush()
        bundles.add_bundle(
            session,
            feature=FEATURE,
            version=version,
            target_path=target_path_for(FEATURE, version),
            sha256=sha,
            length=len(data),
            models=list(MODELS),
            min_firmware="",
            signer_keyids=[s["keyid"] for s in json.loads(targets)["signatures"]],
            request_id=None,
            now=SystemClock().now(),
        )
    return sha


def _resign_snapshot_and_timestamp(
    arena: Arena, targets_version: int, targets: bytes, now: datetime
) -> None:
    keys = arena.stack.keys
    store = arena.metadata_store
    snapshot = Snapshot(
        version=arena.latest_version("snapshot") + 1,
        expires=now + timedelta(days=7),
        meta={"targets.json": _meta_file(targets_version, targets)},
    )
    snapshot_bytes = sign_metadata(Metadata(snapshot), [load_signer(keys.snapshot_key)])
    store.put_metadata("snapshot", snapshot.version, snapshot_bytes)
    timestamp = Timestamp(
        version=arena.latest_version("timestamp") + 1,
        expires=now + timedelta(days=1),
        snapshot_meta=_meta_file(snapshot.version, snapshot_bytes),
    )
    store.put_metadata(
        "timestamp",
        timestamp.version,
        sign_metadata(Metadata(timestamp), [load_signer(keys.timestamp_key)]),
    )


def _meta_file(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": _sha(data)})


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- desired states -----------------------------------------------------------------------


def tampered(envelope: bytes, edit: Callable[[common_pb2.DesiredState], None]) -> bytes:
    """The envelope with its payload edited by `edit`, the director's signature kept."""
    env = common_pb2.Envelope.FromString(envelope)
    state = common_pb2.DesiredState.FromString(env.payload)
    edit(state)
    env.payload = state.SerializeToString(deterministic=True)
    return env.SerializeToString()


def generation_of(envelope: bytes) -> int:
    """The generation a desired-state envelope claims (unverified)."""
    env = common_pb2.Envelope.FromString(envelope)
    return int(common_pb2.DesiredState.FromString(env.payload).generation)


# -- checks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSnapshot:
    """What a device runs and what it has accepted, for before/after comparison."""

    installed: dict[str, tuple[str, str, bool]]
    generation: int
    time_floor: datetime | None

    @classmethod
    def of(cls, device: SimDevice) -> DeviceSnapshot:
        return cls(
            installed={
                name: (i.version, i.sha256.hex(), i.active) for name, i in device.installed.items()
            },
            generation=device.trust.accepted_generation,
            time_floor=device.trust.time_floor,
        )


def snapshots(arena: Arena) -> dict[str, DeviceSnapshot]:
    """A `DeviceSnapshot` of every device, by id."""
    return {d.device_id: DeviceSnapshot.of(d) for d in arena.devices}


def assert_unchanged(
    arena: Arena,
    before: dict[str, DeviceSnapshot],
    *,
    devices: Sequence[SimDevice] | None = None,
    accepted_genuine_state: bool = False,
) -> None:
    """Each device runs what it ran before and accepted no desired state since.

    `accepted_genuine_state`: the attack was on the bundle or the TUF metadata,
    not on the director's desired state, which was genuine and newer, so its
    generation is accepted (and the time floor may rise to its signing time);
    only what the device runs must not change.
    """
    for device in devices or arena.devices:
        was, now = before[device.device_id], DeviceSnapshot.of(device)
        what = f"{device.device_id}: before {was}, after {now}"
        assert now.installed == was.installed, what
        if accepted_genuine_state:
            assert now.generation > was.generation, what
        else:
            assert (now.generation, now.time_floor) == (was.generation, was.time_floor), what


def trusted_metadata(arena: Arena, *names: str) -> dict[str, dict[str, str]]:
    """Per device, sha256 of each TUF metadata file it trusts (all, or just `names`)."""
    out: dict[str, dict[str, str]] = {}
    for device in arena.devices:
        tuf = arena.device_dir(device) / "tuf"
        files = [tuf / n for n in names] if names else sorted(tuf.rglob("*.json"))
        out[device.device_id] = {str(p.relative_to(tuf)): _sha(p.read_bytes()) for p in files}
    return out


def trusted_version(arena: Arena, device: SimDevice, role: str) -> int:
    """Version of the `role` metadata the device trusts."""
    doc = json.loads((arena.device_dir(device) / "tuf" / f"{role}.json").read_bytes())
    return int(doc["signed"]["version"])


def kept_files(arena: Arena) -> dict[str, list[str]]:
    """Per device, the files in its download directory: bundles, complete or partial."""
    return {
        d.device_id: sorted(
            str(p.relative_to(d.trust.downloads)) for p in d.trust.downloads.rglob("*")
        )
        for d in arena.devices
    }


def stored_failures(arena: Arena, rollout_id: str) -> Counter[str]:
    """error_code of every FAILED DeviceEvent the control plane stored for a rollout."""
    with arena.stack.control_plane.store.transaction() as session:
        codes = session.exec(
            select(DeviceEventRow.error_code).where(
                DeviceEventRow.rollout_id == rollout_id, col(DeviceEventRow.state) == "FAILED"
            )
        ).all()
    return Counter(codes)


def refusals(arena: Arena, rollout_id: str, count: int, *, timeout: float = 30.0) -> dict[str, int]:
    """Wait until `count` failures of a rollout are counted; return them by reason.

    The rollout report (`failures_by_reason`), the FAILED events the control
    plane stored (their `error_code`) and what the devices say they sent must agree.
    """

    def counted() -> dict[str, int]:
        return {c.key: c.count for c in arena.report(rollout_id).failures_by_reason}

    wait_for(
        lambda: sum(counted().values()) >= count,
        what=f"{count} failures to be counted in the report of {rollout_id}",
        timeout=timeout,
    )
    views = {
        "report": counted(),
        "stored events": dict(stored_failures(arena, rollout_id)),
        "devices": dict(arena.fleet.failure_reasons(rollout_id)),
    }
    assert views["report"] == views["stored events"] == views["devices"], views
    return views["report"]


def utcnow() -> datetime:
    return datetime.now(UTC)
