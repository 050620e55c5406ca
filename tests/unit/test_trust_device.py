"""A device verifying desired states and bundles against an in-memory control plane."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Timestamp

from ota.clock import ManualClock
from ota.device import DeviceTrust, StaleDesiredState
from ota.device.retry import RetryPolicy
from ota.errors import VerificationError
from ota.signing import (
    OnlineKeys,
    add_target,
    create_initial_targets,
    create_root,
    target_path_for,
)
from ota.trust import Director, ImageRepository
from ota.v1 import common_pb2

NOW = datetime(2026, 1, 1, tzinfo=UTC)
BUNDLE = os.urandom(3000)


class DictStore:
    def __init__(self) -> None:
        self.data: dict[tuple[str, int], bytes] = {}

    def get_metadata(self, role: str, version: int | None) -> bytes | None:
        if version is None:
            versions = [v for (r, v) in self.data if r == role]
            return self.data[(role, max(versions))] if versions else None
        return self.data.get((role, version))

    def latest_versions(self) -> dict[str, int]:
        latest: dict[str, int] = {}
        for role, version in self.data:
            latest[role] = max(version, latest.get(role, 0))
        return latest

    def put_metadata(self, role: str, version: int, content: bytes) -> None:
        assert (role, version) not in self.data
        self.data[(role, version)] = content


class Source:
    """What the device simulator's gRPC client does, minus the network; can misbehave."""

    def __init__(self, repo: ImageRepository) -> None:
        self.repo = repo
        self.blobs: dict[str, bytes] = {}
        self.metadata_override: dict[str, bytes] = {}
        self.cut_after: int | None = None  # raise once after this many bytes
        self.ignore_max_length = False
        self.calls: list[tuple[str, int]] = []
        self.metadata_fetches = 0

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        self.metadata_fetches += 1
        return self.metadata_override.get(role) or self.repo.metadata(role, version)

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        self.calls.append((target_path, offset))
        data = self.blobs.get(target_path, b"")
        end = len(data) if self.ignore_max_length else offset + max_length
        for start in range(offset, min(end, len(data)), 1024):
            if self.cut_after is not None and start >= self.cut_after:
                self.cut_after = None
                raise ConnectionResetError("stream cut")
            yield data[start : min(start + 1024, end)]


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = ManualClock(NOW)
        self.root_key, self.release, self.snapshot, self.timestamp, self.director_key = (
            CryptoSigner.generate_ed25519() for _ in range(5)
        )
        online = OnlineKeys(
            snapshot=self.snapshot.public_key,
            timestamp=self.timestamp.public_key,
            director=self.director_key.public_key,
        )
        self.root = create_root(
            [self.root_key],
            [self.root_key.public_key],
            [self.release.public_key],
            online,
            expires=NOW + timedelta(days=365),
        )
        self.repo = ImageRepository(
            DictStore(),
            snapshot_signer=self.snapshot,
            timestamp_signer=self.timestamp,
            clock=self.clock,
        )
        self.repo.bootstrap(
            self.root, create_initial_targets([self.release], expires=NOW + timedelta(days=90))
        )
        self.source = Source(self.repo)
        self.director = Director(self.director_key)
        self.generation = 0
        self.sleeps: list[float] = []

    def publish(
        self, data: bytes = BUNDLE, *, version: str = "1.0", models: tuple[str, ...] = ("ev6",)
    ) -> common_pb2.FeatureAssignment:
        path = target_path_for("nav", version)
        digest = hashlib.sha256(data).digest()
        current = self.repo.metadata("targets")
        assert current is not None
        signed = add_target(
            current,
            target_path=path,
            length=len(data),
            sha256_hex=digest.hex(),
            custom=_custom(version, models),
            signers=[self.release],
            expires=NOW + timedelta(days=90),
        )
        self.repo.accept_targets(signed, target_path=path)
        self.repo.commit_targets(signed)
        self.source.blobs[path] = data
        return common_pb2.FeatureAssignment(
            feature="nav", version=version, target_path=path, sha256=digest, length=len(data)
        )

    def device(
        self,
        *,
        device_id: str = "car-1",
        model: str = "ev6",
        sleep: Callable[[float], None] | None = None,
    ) -> DeviceTrust:
        return DeviceTrust(
            device_id=device_id,
            model=model,
            firmware="4.10",
            state_dir=self.tmp_path / device_id,
            trusted_root=self.root,
            source=self.source,
            clock=self.clock,
            retry=RetryPolicy(sleep=sleep or self.sleeps.append),
            durable=False,
        )

    def desired(
        self,
        *,
        device_id: str = "car-1",
        generation: int | None = None,
        issued: datetime | None = None,
        ttl: timedelta = timedelta(hours=1),
        director: Director | None = None,
    ) -> bytes:
        if generation is None:
            self.generation += 1
            generation = self.generation
        state = common_pb2.DesiredState(device_id=device_id, generation=generation)
        state.issued_at.FromDatetime(issued or self.clock.now())
        state.expires_at.FromDatetime((issued or self.clock.now()) + ttl)
        return (director or self.director).sign(state).SerializeToString()


def _custom(version: str, models: tuple[str, ...]) -> dict[str, object]:
    return {"feature": "nav", "version": version, "models": list(models), "min_firmware": "4.2"}


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _reason(call: Callable[[], object]) -> str:
    with pytest.raises(VerificationError) as err:
        call()
    return err.value.reason


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# -- bundles --------------------------------------------------------------------------


def test_happy_path_downloads_the_exact_signed_bytes(world: World) -> None:
    assignment = world.publish()
    device = world.device()
    path = device.fetch_bundle(assignment)
    assert path.read_bytes() == BUNDLE
    assert path.parent == world.tmp_path / "car-1" / "downloads"
    assert not list(path.parent.glob("*.part"))
    calls = len(world.source.calls)
    assert device.fetch_bundle(assignment) == path  # cached and re-verified
    assert len(world.source.calls) == calls


def test_tampered_bundle_of_the_same_length_is_refused(world: World) -> None:
    assignment = world.publish()
    world.source.blobs[assignment.target_path] = bytes([BUNDLE[0] ^ 1]) + BUNDLE[1:]
    device = world.device()
    assert _reason(lambda: device.fetch_bundle(assignment)) == "HASH_MISMATCH"
    assert list((world.tmp_path / "car-1" / "downloads").iterdir()) == []


def test_truncated_bundle_is_refused(world: World) -> None:
    assignment = world.publish()
    world.source.blobs[assignment.target_path] = BUNDLE[:-10]
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "LENGTH_MISMATCH"


def test_missing_bundle_bytes_fail_the_download(world: World) -> None:
    assignment = world.publish()
    del world.source.blobs[assignment.target_path]
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "DOWNLOAD_FAILED"


def test_endless_bundle_is_cut_at_the_signed_length(world: World) -> None:
    assignment = world.publish()
    world.source.blobs[assignment.target_path] = BUNDLE + b"x" * 100_000
    world.source.ignore_max_length = True
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "LENGTH_MISMATCH"


def test_a_cut_stream_resumes_from_the_last_byte(world: World) -> None:
    assignment = world.publish()
    world.source.cut_after = 2048
    path = world.device().fetch_bundle(assignment)
    assert path.read_bytes() == BUNDLE
    assert world.source.calls == [(assignment.target_path, 0), (assignment.target_path, 2048)]


def test_director_digest_must_equal_the_release_signed_one(world: World) -> None:
    assignment = world.publish()
    other = hashlib.sha256(b"evil").digest()
    lying = common_pb2.FeatureAssignment()
    lying.CopyFrom(assignment)
    lying.sha256 = other
    assert _reason(lambda: world.device().fetch_bundle(lying)) == "HASH_MISMATCH"
    lying.sha256, lying.length = assignment.sha256, assignment.length + 1
    assert _reason(lambda: world.device().fetch_bundle(lying)) == "LENGTH_MISMATCH"


def test_director_cannot_relabel_a_signed_bundle(world: World) -> None:
    assignment = world.publish()
    assignment.version = "2.0"
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "INCOMPATIBLE"


def test_bundle_not_signed_by_a_release_key_is_refused(world: World) -> None:
    world.publish()
    unknown = common_pb2.FeatureAssignment(feature="nav", version="9.0", length=1)
    unknown.target_path = target_path_for("nav", "9.0")
    unknown.sha256 = hashlib.sha256(b"x").digest()
    assert _reason(lambda: world.device().fetch_bundle(unknown)) == "SIGNATURE_INVALID"
    # It looked again under the retry policy before refusing (a cache may lag).
    assert len(world.sleeps) == RetryPolicy().attempts - 1


def test_a_bundle_published_while_the_device_looked_is_found_on_the_next_look(
    world: World,
) -> None:
    # A cache served a timestamp older than the publication the director names.
    path = target_path_for("nav", "1.0")
    named = common_pb2.FeatureAssignment(
        feature="nav", version="1.0", target_path=path, sha256=hashlib.sha256(BUNDLE).digest()
    )
    named.length = len(BUNDLE)
    device = world.device(sleep=lambda _: world.publish())
    assert device.fetch_bundle(named).read_bytes() == BUNDLE


def test_bundle_for_another_model_or_newer_firmware_is_refused(world: World) -> None:
    assignment = world.publish(models=("ev9",))
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "INCOMPATIBLE"
    device = DeviceTrust(
        device_id="old",
        model="ev9",
        firmware="4.1",
        state_dir=world.tmp_path / "old",
        trusted_root=world.root,
        source=world.source,
        clock=world.clock,
        durable=False,
    )
    with pytest.raises(VerificationError, match=r"needs firmware 4\.2") as err:
        device.fetch_bundle(assignment)
    assert err.value.reason == "INCOMPATIBLE"


# -- TUF metadata ---------------------------------------------------------------------


def test_expired_timestamp_is_refused_on_the_device_clock(world: World) -> None:
    assignment = world.publish()
    world.clock.advance(timedelta(days=1, seconds=1))
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "METADATA_EXPIRED"
    world.repo.refresh_timestamp(min_remaining=timedelta(hours=1))
    assert world.device().fetch_bundle(assignment).read_bytes() == BUNDLE


def test_forged_timestamp_is_refused_and_changes_nothing(world: World) -> None:
    assignment = world.publish()
    device = world.device()
    device.fetch_bundle(assignment)
    before = _tree(world.tmp_path / "car-1" / "tuf")
    md = Metadata[Timestamp].from_bytes(world.repo.metadata("timestamp") or b"")
    md.signed.version += 5
    md.sign(CryptoSigner.generate_ed25519())
    world.source.metadata_override["timestamp"] = md.to_bytes()
    assert _reason(lambda: device.fetch_bundle(assignment)) == "SIGNATURE_INVALID"
    assert _tree(world.tmp_path / "car-1" / "tuf") == before


def test_replayed_older_timestamp_is_refused(world: World) -> None:
    old = world.repo.metadata("timestamp")
    assert old is not None
    assignment = world.publish()
    device = world.device()
    device.fetch_bundle(assignment)
    world.source.metadata_override["timestamp"] = old
    assert _reason(lambda: device.fetch_bundle(assignment)) == "ROLLBACK_REFUSED"


def test_mix_and_match_of_targets_and_snapshot_is_refused(world: World) -> None:
    old_targets = world.repo.metadata("targets")
    assert old_targets is not None
    assignment = world.publish()
    world.source.metadata_override["targets"] = old_targets  # served as 2.targets.json
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "HASH_MISMATCH"


def test_garbage_metadata_is_refused(world: World) -> None:
    assignment = world.publish()
    world.source.metadata_override["timestamp"] = b'{"signed": {"_type": "timestamp", "version'
    assert _reason(lambda: world.device().fetch_bundle(assignment)) == "METADATA_INVALID"


def _rotated_root(world: World, new_root_key: CryptoSigner, *, cross_sign: bool) -> bytes:
    md = Metadata[Root].from_bytes(world.root)
    root = md.signed
    root.version = 2
    root.revoke_key(world.root_key.public_key.keyid, "root")
    root.add_key(new_root_key.public_key, "root")
    new_director = CryptoSigner.generate_ed25519()
    root.keys[new_director.public_key.keyid] = new_director.public_key
    root.unrecognized_fields["x-ota-director"] = {
        "keyids": [new_director.public_key.keyid],
        "threshold": 1,
    }
    world.director = Director(new_director)
    md.sign(new_root_key)
    if cross_sign:
        md.sign(world.root_key, append=True)
    return md.to_bytes()


def test_cross_signed_root_rotation_moves_the_director_key(world: World) -> None:
    device = world.device()
    device.verify_desired_state(world.desired())
    old_director = world.director
    world.repo.rotate_root(_rotated_root(world, CryptoSigner.generate_ed25519(), cross_sign=True))
    # The new director key is unknown to root v1: the device looks for a newer root.
    assert device.verify_desired_state(world.desired()).generation == 2
    assert _reason(lambda: device.verify_desired_state(world.desired(director=old_director))) == (
        "SIGNATURE_INVALID"
    )
    # After a restart the device still trusts root v2, without asking the network first.
    restarted = world.device()
    fetches = world.source.metadata_fetches
    assert restarted.verify_desired_state(world.desired()).generation == 4
    assert world.source.metadata_fetches == fetches


def test_self_signed_root_rotation_is_refused(world: World) -> None:
    forged = _rotated_root(world, CryptoSigner.generate_ed25519(), cross_sign=False)
    world.source.metadata_override["root"] = forged  # served as 2.root.json
    device = world.device()
    assert _reason(device.refresh_metadata) == "SIGNATURE_INVALID"
    assert _reason(lambda: device.verify_desired_state(world.desired())) == "SIGNATURE_INVALID"
    assert not (world.tmp_path / "car-1" / "tuf" / "root_history" / "2.root.json").exists()


# -- desired states -------------------------------------------------------------------


def test_desired_state_is_accepted_and_its_generation_persisted(world: World) -> None:
    device = world.device()
    state = device.verify_desired_state(world.desired())
    assert (state.device_id, state.generation) == ("car-1", 1)
    assert device.accepted_generation == 1
    assert device.time_floor == NOW
    assert world.device().accepted_generation == 1  # survives a restart


def test_a_desired_state_is_verified_without_a_metadata_refresh(world: World) -> None:
    # A whole fleet is notified at once: its embedded root already names the director.
    device = world.device()
    fetches = world.source.metadata_fetches
    assert device.verify_desired_state(world.desired()).generation == 1
    assert world.source.metadata_fetches == fetches


def test_replayed_or_repeated_desired_state_is_stale(world: World) -> None:
    device = world.device()
    first = world.desired()
    device.verify_desired_state(world.desired())
    device.verify_desired_state(world.desired())
    with pytest.raises(StaleDesiredState) as err:
        device.verify_desired_state(first)
    assert err.value.reason == "ROLLBACK_REFUSED"
    with pytest.raises(StaleDesiredState):
        world.device().verify_desired_state(world.desired(generation=3))
    assert device.accepted_generation == 3


def test_desired_state_for_another_device_is_refused(world: World) -> None:
    device = world.device()
    assert _reason(lambda: device.verify_desired_state(world.desired(device_id="car-2"))) == (
        "WRONG_DEVICE"
    )
    assert device.accepted_generation == 0


def test_desired_state_signed_by_an_unknown_key_is_refused(world: World) -> None:
    forger = Director(CryptoSigner.generate_ed25519())
    device = world.device()
    assert _reason(lambda: device.verify_desired_state(world.desired(director=forger))) == (
        "SIGNATURE_INVALID"
    )


def test_desired_state_signed_by_the_release_key_is_refused(world: World) -> None:
    wrong_role = Director(world.release)
    device = world.device()
    assert _reason(lambda: device.verify_desired_state(world.desired(director=wrong_role))) == (
        "SIGNATURE_INVALID"
    )


def test_tampered_desired_state_is_refused(world: World) -> None:
    envelope = common_pb2.Envelope.FromString(world.desired())
    state = common_pb2.DesiredState.FromString(envelope.payload)
    state.generation = 99
    envelope.payload = state.SerializeToString()
    device = world.device()
    assert _reason(lambda: device.verify_desired_state(envelope.SerializeToString())) == (
        "SIGNATURE_INVALID"
    )
    assert device.accepted_generation == 0


def test_garbage_envelope_is_refused(world: World) -> None:
    assert _reason(lambda: world.device().verify_desired_state(b"\xff\x00garbage")) == (
        "METADATA_INVALID"
    )


def test_expired_desired_state_is_refused(world: World) -> None:
    stale = world.desired(issued=NOW - timedelta(hours=2))
    assert _reason(lambda: world.device().verify_desired_state(stale)) == "METADATA_EXPIRED"


def test_device_clock_far_behind_is_reported(world: World) -> None:
    world.clock.set(NOW - timedelta(hours=5))
    fresh = world.desired(issued=NOW, ttl=timedelta(days=1))
    assert _reason(lambda: world.device().verify_desired_state(fresh)) == "CLOCK_INVALID"


def test_clock_reset_to_1970_still_refuses_expired_states(world: World) -> None:
    device = world.device()
    device.verify_desired_state(world.desired())  # the time floor is now NOW
    fresh = world.desired(ttl=timedelta(minutes=30))
    expired = world.desired(issued=NOW - timedelta(hours=1), ttl=timedelta(minutes=30))
    world.clock.set(datetime(1970, 1, 1, tzinfo=UTC))
    # Expired against the time floor, even though the device clock says 1970...
    assert _reason(lambda: device.verify_desired_state(expired)) == "METADATA_EXPIRED"
    # ...and a fresh state cannot be judged: the clock is reported, nothing is accepted.
    assert _reason(lambda: device.verify_desired_state(fresh)) == "CLOCK_INVALID"
    assert device.accepted_generation == 1
