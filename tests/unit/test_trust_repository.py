"""The control plane's image repository: what it accepts and what it publishes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from ota.clock import ManualClock
from ota.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from ota.signing import (
    OnlineKeys,
    add_target,
    create_initial_targets,
    create_root,
    target_path_for,
)
from ota.trust import ImageRepository

NOW = datetime(2026, 1, 1, tzinfo=UTC)


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
        if (role, version) in self.data:
            raise AlreadyExists(f"{version}.{role}.json exists")
        self.data[(role, version)] = content


def _signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@dataclass
class World:
    clock: ManualClock = field(default_factory=lambda: ManualClock(NOW))
    store: DictStore = field(default_factory=DictStore)
    root_key: CryptoSigner = field(default_factory=_signer)
    releases: list[CryptoSigner] = field(default_factory=lambda: [_signer(), _signer()])
    snapshot: CryptoSigner = field(default_factory=_signer)
    timestamp: CryptoSigner = field(default_factory=_signer)
    director: CryptoSigner = field(default_factory=_signer)
    release_threshold: int = 1

    def online(self) -> OnlineKeys:
        return OnlineKeys(
            snapshot=self.snapshot.public_key,
            timestamp=self.timestamp.public_key,
            director=self.director.public_key,
        )

    def root(self) -> bytes:
        return create_root(
            [self.root_key],
            [self.root_key.public_key],
            [k.public_key for k in self.releases],
            self.online(),
            release_threshold=self.release_threshold,
            expires=NOW + timedelta(days=365),
        )

    def repo(self) -> ImageRepository:
        return ImageRepository(
            self.store,
            snapshot_signer=self.snapshot,
            timestamp_signer=self.timestamp,
            clock=self.clock,
        )

    def bootstrapped(self) -> ImageRepository:
        repo = self.repo()
        initial = create_initial_targets(self.releases, expires=NOW + timedelta(days=90))
        repo.bootstrap(self.root(), initial)
        return repo


def _sign_bundle(
    current: bytes,
    signers: list[Signer],
    *,
    feature: str = "nav",
    version: str = "1.0",
    data: bytes = b"bundle bytes",
) -> tuple[bytes, str]:
    path = target_path_for(feature, version)
    signed = add_target(
        current,
        target_path=path,
        length=len(data),
        sha256_hex=hashlib.sha256(data).hexdigest(),
        custom={"feature": feature, "version": version, "models": ["ev6"], "min_firmware": "4.0"},
        signers=signers,
        expires=NOW + timedelta(days=90),
    )
    return signed, path


def _current(repo: ImageRepository, role: str) -> bytes:
    data = repo.metadata(role)
    assert data is not None
    return data


def test_bootstrap_publishes_v1_of_every_role_and_is_idempotent() -> None:
    world = World()
    repo = world.bootstrapped()
    assert sorted(world.store.data) == [
        (r, 1) for r in ("root", "snapshot", "targets", "timestamp")
    ]
    before = dict(world.store.data)
    repo.bootstrap(_current(repo, "root"), _current(repo, "targets"))
    assert world.store.data == before

    other = World(store=world.store, snapshot=world.snapshot, timestamp=world.timestamp)
    with pytest.raises(FailedPrecondition, match="different root"):
        other.bootstrapped()


def test_bootstrap_refuses_online_keys_the_root_does_not_name() -> None:
    world = World()
    root = world.root()
    wrong = ImageRepository(
        world.store, snapshot_signer=_signer(), timestamp_signer=world.timestamp, clock=world.clock
    )
    with pytest.raises(FailedPrecondition, match="snapshot key"):
        wrong.bootstrap(root, create_initial_targets(world.releases, expires=NOW + timedelta(1)))
    assert world.store.data == {}


def test_accept_then_commit_publishes_snapshot_and_timestamp_over_the_new_targets() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [world.releases[0]])

    accepted = repo.accept_targets(signed, target_path=path)
    assert accepted.path == path
    assert accepted.sha256_hex == hashlib.sha256(b"bundle bytes").hexdigest()
    assert accepted.length == len(b"bundle bytes")
    assert accepted.custom["models"] == ["ev6"]
    assert accepted.signer_keyids == (world.releases[0].public_key.keyid,)
    assert repo.target(path) is None  # accepted is not yet published

    repo.commit_targets(signed)
    assert repo.metadata("targets") == signed  # stored byte for byte
    assert repo.target(path) == accepted
    snapshot = Metadata[Snapshot].from_bytes(_current(repo, "snapshot")).signed
    assert snapshot.version == 2
    assert snapshot.meta["targets.json"].version == 2
    assert snapshot.meta["targets.json"].hashes == {"sha256": hashlib.sha256(signed).hexdigest()}
    timestamp = Metadata[Timestamp].from_bytes(_current(repo, "timestamp")).signed
    assert (timestamp.version, timestamp.snapshot_meta.version) == (2, 2)


def test_targets_signed_by_an_unknown_key_are_refused() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [_signer()])
    with pytest.raises(PermissionDenied, match="0 of the 1 release keys") as err:
        repo.accept_targets(signed, target_path=path)
    assert "a key the root does not know" in err.value.message
    with pytest.raises(PermissionDenied):
        repo.commit_targets(signed)
    assert repo.target(path) is None


def test_targets_signed_by_the_online_snapshot_key_are_refused() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [world.snapshot])
    with pytest.raises(PermissionDenied, match="the snapshot key"):
        repo.accept_targets(signed, target_path=path)


def test_below_threshold_and_duplicated_signatures_are_refused() -> None:
    world = World(release_threshold=2)
    repo = world.bootstrapped()
    one, path = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    with pytest.raises(PermissionDenied, match="1 of the 2"):
        repo.accept_targets(one, target_path=path)
    # The same key's signature listed twice: python-tuf refuses the file outright.
    doubled = one.replace(b'"signatures":[', b'"signatures":[' + _first_signature(one) + b",")
    with pytest.raises(InvalidArgument, match="Multiple signatures"):
        repo.accept_targets(doubled, target_path=path)
    both, path = _sign_bundle(_current(repo, "targets"), world.releases)
    assert len(repo.accept_targets(both, target_path=path).signer_keyids) == 2


def _first_signature(data: bytes) -> bytes:
    start = data.index(b'"signatures":[') + len(b'"signatures":[')
    return data[start : data.index(b"}", start) + 1]


def test_a_concurrent_publish_aborts_the_slower_one() -> None:
    world = World()
    repo = world.bootstrapped()
    base = _current(repo, "targets")
    first, first_path = _sign_bundle(base, [world.releases[0]], feature="nav")
    second, second_path = _sign_bundle(base, [world.releases[1]], feature="radio")
    repo.accept_targets(first, target_path=first_path)
    repo.accept_targets(second, target_path=second_path)
    repo.commit_targets(first)
    with pytest.raises(Aborted, match="retry"):
        repo.accept_targets(second, target_path=second_path)
    with pytest.raises(Aborted):
        repo.commit_targets(second)
    # Re-signed over the current targets, it goes through.
    again, _ = _sign_bundle(_current(repo, "targets"), [world.releases[1]], feature="radio")
    repo.commit_targets(again)
    assert repo.target(first_path) is not None and repo.target(second_path) is not None


def test_changing_or_dropping_a_published_bundle_is_refused() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, _ = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    repo.commit_targets(signed)
    md = Metadata[Targets].from_bytes(signed)
    md.signed.targets.clear()
    md.signed.version += 1
    md.sign(world.releases[0])
    with pytest.raises(InvalidArgument, match="change or drop"):
        repo.commit_targets(md.to_bytes())


def test_accept_requires_exactly_the_named_bundle() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    with pytest.raises(InvalidArgument, match="not in the signed targets"):
        repo.accept_targets(signed, target_path=target_path_for("nav", "9.9"))
    two, _ = _sign_bundle(signed, [world.releases[0]], feature="radio")
    md = Metadata[Targets].from_bytes(two)
    md.signed.version = 2
    md.sign(world.releases[0])
    with pytest.raises(InvalidArgument, match="one bundle at a time"):
        repo.accept_targets(md.to_bytes(), target_path=path)


def test_expired_or_garbled_targets_are_refused() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    world.clock.advance(timedelta(days=91))
    with pytest.raises(InvalidArgument, match="expired"):
        repo.accept_targets(signed, target_path=path)
    with pytest.raises(InvalidArgument) as err:
        repo.accept_targets(b'{"signed": 1}', target_path=path)
    assert err.value.field == "signed_targets"
    with pytest.raises(InvalidArgument, match="expected targets"):
        repo.accept_targets(_current(repo, "root"), target_path=path)


def test_refresh_timestamp_resigns_only_when_close_to_expiry() -> None:
    world = World()
    repo = world.bootstrapped()
    assert repo.refresh_timestamp(min_remaining=timedelta(hours=6)) is False
    world.clock.advance(timedelta(hours=19))
    assert repo.refresh_timestamp(min_remaining=timedelta(hours=6)) is True
    timestamp = Metadata[Timestamp].from_bytes(_current(repo, "timestamp")).signed
    assert timestamp.version == 2
    assert timestamp.expires == NOW + timedelta(hours=19, days=1)
    # Close to the snapshot's expiry the snapshot is re-signed too.
    world.clock.advance(timedelta(days=6, hours=12))
    assert repo.refresh_timestamp(min_remaining=timedelta(hours=6)) is True
    assert Metadata[Snapshot].from_bytes(_current(repo, "snapshot")).signed.version == 2


def test_director_keys_come_from_the_root() -> None:
    world = World()
    keys, threshold = world.bootstrapped().director_keys()
    assert keys == {world.director.public_key.keyid: world.director.public_key}
    assert threshold == 1


def test_unknown_roles_and_versions() -> None:
    repo = World().bootstrapped()
    assert repo.metadata("root", 2) is None
    with pytest.raises(InvalidArgument):
        repo.metadata("mirrors")
    with pytest.raises(InvalidArgument):
        repo.metadata("root", 0)


def test_root_rotation_needs_both_old_and_new_root_keys() -> None:
    world = World()
    repo = world.bootstrapped()
    new_key = _signer()
    md = Metadata[Root].from_bytes(_current(repo, "root"))
    md.signed.version = 2
    md.signed.revoke_key(world.root_key.public_key.keyid, "root")
    md.signed.add_key(new_key.public_key, "root")
    md.sign(new_key)
    with pytest.raises(PermissionDenied, match="root v2"):
        repo.rotate_root(md.to_bytes())  # self-signed only
    md.sign(world.root_key, append=True)
    repo.rotate_root(md.to_bytes())
    assert repo.metadata("root", 2) == md.to_bytes()
    assert Metadata[Timestamp].from_bytes(_current(repo, "timestamp")).signed.version == 2


def test_refresh_finishes_a_commit_that_stopped_before_its_snapshot() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, _ = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    world.store.put_metadata("targets", 2, signed)  # a crash right after this write
    assert repo.refresh_timestamp(min_remaining=timedelta(0)) is True
    snapshot = Metadata[Snapshot].from_bytes(_current(repo, "snapshot")).signed
    assert snapshot.meta["targets.json"].version == 2
    assert repo.refresh_timestamp(min_remaining=timedelta(0)) is False


def test_bundle_custom_fields_are_checked_on_the_server_too() -> None:
    world = World()
    repo = world.bootstrapped()
    signed, path = _sign_bundle(_current(repo, "targets"), [world.releases[0]])
    md = Metadata[Targets].from_bytes(signed)
    md.signed.targets[path].unrecognized_fields["custom"]["models"] = []
    md.sign(world.releases[0])
    with pytest.raises(InvalidArgument) as err:
        repo.commit_targets(md.to_bytes())
    assert err.value.field == "custom.models"
