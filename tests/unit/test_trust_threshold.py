"""Release thresholds and key rotation, pure: the image repository over an in-memory store.

What a release engineer's machine builds (`release`, `rootgen`), what the
control plane accepts (`ImageRepository`), and what a standard TUF client
(python-tuf's ngclient, as on the devices) then trusts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signature, Signer
from tuf.api.exceptions import DownloadHTTPError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from ota.clock import ManualClock
from ota.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from ota.keyring import KeyPaths, generate_keyring
from ota.signing import (
    OnlineKeys,
    add_target,
    create_initial_targets,
    create_root,
    load_public_key,
    target_path_for,
)
from ota.signing.release import (
    TargetClaim,
    check_file,
    resign_targets,
    review_pending,
    sign_pending,
)
from ota.signing.rootgen import RootChange, next_root, verify_root_chain
from ota.trust import ImageRepository

# Real time: python-tuf's client checks expiry against the system clock.
NOW = datetime.now(UTC).replace(microsecond=0)
EXPIRES = NOW + timedelta(days=90)
DATA = b"lane assist 2.0 " * 100


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
    """A 2-of-3 release threshold, one root key, and the online keys."""

    clock: ManualClock = field(default_factory=lambda: ManualClock(NOW))
    store: DictStore = field(default_factory=DictStore)
    root_key: CryptoSigner = field(default_factory=_signer)
    releases: list[CryptoSigner] = field(default_factory=lambda: [_signer() for _ in range(3)])
    snapshot: CryptoSigner = field(default_factory=_signer)
    timestamp: CryptoSigner = field(default_factory=_signer)
    director: CryptoSigner = field(default_factory=_signer)

    def __post_init__(self) -> None:
        self.root_v1 = create_root(
            [self.root_key],
            [self.root_key.public_key],
            [k.public_key for k in self.releases],
            OnlineKeys(
                snapshot=self.snapshot.public_key,
                timestamp=self.timestamp.public_key,
                director=self.director.public_key,
            ),
            release_threshold=2,
            expires=NOW + timedelta(days=365),
        )
        self.repo = self.repository(self.snapshot, self.timestamp)
        self.repo.bootstrap(self.root_v1, create_initial_targets(self.releases, expires=EXPIRES))

    def repository(self, snapshot: Signer, timestamp: Signer) -> ImageRepository:
        return ImageRepository(
            self.store, snapshot_signer=snapshot, timestamp_signer=timestamp, clock=self.clock
        )

    def current(self, role: str) -> bytes:
        data = self.repo.metadata(role)
        assert data is not None
        return data

    def sign_bundle(
        self, signers: list[Signer], *, version: str = "2.0.0", data: bytes = DATA
    ) -> tuple[bytes, str]:
        path = target_path_for("lane-assist", version)
        signed = add_target(
            self.current("targets"),
            target_path=path,
            length=len(data),
            sha256_hex=hashlib.sha256(data).hexdigest(),
            custom=_custom(version),
            signers=signers,
            expires=EXPIRES,
        )
        return signed, path


def _custom(version: str) -> dict[str, object]:
    return {"feature": "lane-assist", "version": version, "models": ["ev6"], "min_firmware": "4.0"}


def _claim(path: str, version: str = "2.0.0", data: bytes = DATA) -> TargetClaim:
    return TargetClaim(path, len(data), hashlib.sha256(data).hexdigest(), _custom(version))


def _targets_paths(data: bytes) -> set[str]:
    return set(Metadata[Targets].from_bytes(data).signed.targets)


# -- thresholds ------------------------------------------------------------------------------


def test_below_threshold_is_reviewed_but_not_committed_and_the_second_signature_completes_it() -> (
    None
):
    world = World()
    one, path = world.sign_bundle([world.releases[0]])
    publication = world.repo.review_targets(one, target_path=path)
    assert not publication.complete and publication.missing == 1
    assert publication.target.signer_keyids == (world.releases[0].public_key.keyid,)
    assert publication.targets_version == 2
    assert world.repo.target(path) is None
    with pytest.raises(PermissionDenied, match="1 of the 2"):
        world.repo.commit_targets(one)  # nothing short of the threshold is ever committed

    # The second engineer reviews exactly what is pending, then signs it offline.
    review = review_pending(
        one,
        current_targets=world.current("targets"),
        root=world.current("root"),
        claimed=_claim(path),
        now=NOW,
    )
    assert (review.signer_keyids, review.threshold, review.missing) == (
        publication.target.signer_keyids,
        2,
        1,
    )
    signatures = sign_pending(one, [world.releases[2]])
    both, completed = world.repo.add_signatures(one, signatures, target_path=path)
    assert completed.complete
    assert set(completed.target.signer_keyids) == {
        world.releases[0].public_key.keyid,
        world.releases[2].public_key.keyid,
    }
    world.repo.commit_targets(both)
    assert world.repo.target(path) is not None


def test_a_key_that_signs_twice_counts_once() -> None:
    world = World()
    one, path = world.sign_bundle([world.releases[0]])
    again, publication = world.repo.add_signatures(
        one, sign_pending(one, [world.releases[0], world.releases[0]]), target_path=path
    )
    assert publication.target.signer_keyids == (world.releases[0].public_key.keyid,)
    assert not publication.complete
    assert len(json.loads(again)["signatures"]) == 1
    with pytest.raises(PermissionDenied, match="1 of the 2"):
        world.repo.commit_targets(again)


def test_a_signature_by_a_key_outside_the_release_role_is_refused_naming_it() -> None:
    world = World()
    impostor = _signer()
    signed, path = world.sign_bundle([world.releases[0], impostor])
    with pytest.raises(PermissionDenied) as refused:
        world.repo.review_targets(signed, target_path=path)
    assert impostor.public_key.keyid in refused.value.message
    assert "a key the root does not know" in refused.value.message

    one, path = world.sign_bundle([world.releases[0]])
    for key, what in ((impostor, "a key the root does not know"), (world.snapshot, "snapshot")):
        with pytest.raises(PermissionDenied) as refused:
            world.repo.add_signatures(one, sign_pending(one, [key]), target_path=path)
        assert key.public_key.keyid in refused.value.message and what in refused.value.message


def test_a_forged_signature_by_a_release_key_is_refused() -> None:
    world = World()
    one, path = world.sign_bundle([world.releases[0]])
    other, _ = world.sign_bundle([world.releases[1]], version="3.0.0")
    # A real signature by release key 2, but over different metadata.
    borrowed = sign_pending(other, [world.releases[1]])
    with pytest.raises(PermissionDenied, match="does not verify"):
        world.repo.add_signatures(one, borrowed, target_path=path)
    garbage = [Signature(world.releases[1].public_key.keyid, "00" * 64)]
    with pytest.raises(PermissionDenied, match="does not verify"):
        world.repo.add_signatures(one, garbage, target_path=path)


def test_a_pending_publication_goes_stale_when_another_one_commits_first() -> None:
    world = World()
    pending, path = world.sign_bundle([world.releases[0]])
    other, _ = world.sign_bundle(world.releases[:2], version="1.5.0")
    world.repo.commit_targets(other)
    with pytest.raises(Aborted, match="targets changed"):
        world.repo.add_signatures(
            pending, sign_pending(pending, [world.releases[1]]), target_path=path
        )
    with pytest.raises(Aborted, match="Re-publish"):
        review_pending(
            pending,
            current_targets=world.current("targets"),
            root=world.current("root"),
            claimed=_claim(path),
            now=NOW,
        )
    # Re-based on the current targets, it goes through.
    rebased, path = world.sign_bundle(world.releases[1:])
    world.repo.commit_targets(rebased)
    assert _targets_paths(world.current("targets")) == {
        path,
        target_path_for("lane-assist", "1.5.0"),
    }


def test_the_signer_refuses_pending_targets_that_are_not_what_they_claim(tmp_path: Path) -> None:
    world = World()
    pending, path = world.sign_bundle([world.releases[0]])

    def review(claim: TargetClaim, data: bytes = pending) -> None:
        review_pending(
            data,
            current_targets=world.current("targets"),
            root=world.current("root"),
            claimed=claim,
            now=NOW,
        )

    with pytest.raises(InvalidArgument, match="length, sha256_hex"):
        review(_claim(path, data=DATA + b"!"))
    with pytest.raises(InvalidArgument, match=r"custom\.models"):
        review(
            TargetClaim(
                path,
                len(DATA),
                hashlib.sha256(DATA).hexdigest(),
                {**_custom("2.0.0"), "models": ["ev6", "ev9"]},
            )
        )
    with pytest.raises(InvalidArgument, match=re.escape("not features/lane-assist/9.0.0.bundle")):
        review(_claim(target_path_for("lane-assist", "9.0.0"), version="9.0.0"))
    # Pending targets that would also drop a published bundle.
    world.repo.commit_targets(world.sign_bundle(world.releases[:2], version="1.0.0")[0])
    md = Metadata[Targets].from_bytes(world.sign_bundle([world.releases[0]])[0])
    md.signed.targets.pop(target_path_for("lane-assist", "1.0.0"))
    with pytest.raises(InvalidArgument, match="change or drop the published bundle"):
        review(_claim(path), md.to_bytes())

    claim = _claim(path)
    check_file(claim, DATA)
    with pytest.raises(InvalidArgument, match="your file"):
        check_file(claim, DATA[:-1])


# -- rotation --------------------------------------------------------------------------------


class RepoFetcher(FetcherInterface):
    """A TUF client's view of the repository: consistent-snapshot names, 404 when missing."""

    def __init__(self, repo: ImageRepository) -> None:
        self.repo = repo

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rsplit("/", 1)[-1]
        m = re.fullmatch(r"(?:(\d+)\.)?([a-z]+)\.json", name)
        data = self.repo.metadata(m[2], int(m[1]) if m[1] else None) if m else None
        if data is None:
            raise DownloadHTTPError(f"{name} not found", 404)
        return iter([data])


def _device(tmp_path: Path, world: World) -> Updater:
    (tmp_path / "meta").mkdir(exist_ok=True)
    return Updater(
        str(tmp_path / "meta"),
        "ota://metadata/",
        str(tmp_path),
        "ota://targets/",
        RepoFetcher(world.repo),
        bootstrap=world.root_v1,
    )


def test_root_rotation_cross_signed_is_accepted_and_followed_by_devices(tmp_path: Path) -> None:
    world = World()
    new_key = _signer()
    change = RootChange(root_keys=[new_key.public_key])
    with pytest.raises(InvalidArgument, match="current root keys"):
        next_root(world.current("root"), change, [new_key], expires=NOW + timedelta(days=365))
    v2 = next_root(
        world.current("root"), change, [world.root_key, new_key], expires=NOW + timedelta(365)
    )
    rotation = world.repo.rotate_root(v2)
    assert (rotation.root_version, rotation.targets_version) == (2, 1)
    assert world.repo.rotate_root(v2) == rotation  # a retried upload is a no-op
    assert verify_root_chain(world.root_v1, [v2]).signed.version == 2

    device = _device(tmp_path, world)
    device.refresh()
    trusted: Metadata[Root] = Metadata.from_bytes((tmp_path / "meta" / "root.json").read_bytes())
    assert trusted.signed.version == 2
    assert trusted.signed.roles["root"].keyids == [new_key.public_key.keyid]


def test_a_root_signed_only_by_new_keys_is_refused_by_server_and_devices(tmp_path: Path) -> None:
    world = World()
    new_key = _signer()
    md = Metadata[Root].from_bytes(world.current("root"))
    md.signed.version = 2
    md.signed.roles["root"].keyids = [new_key.public_key.keyid]
    md.signed.keys[new_key.public_key.keyid] = new_key.public_key
    md.sign(new_key)
    with pytest.raises(PermissionDenied, match="root v2"):
        world.repo.rotate_root(md.to_bytes())
    assert world.repo.metadata("root", 2) is None
    with pytest.raises(InvalidArgument, match="does not chain"):
        verify_root_chain(world.root_v1, [md.to_bytes()])
    # Even if a compromised server served it, a device would not move to it.
    world.store.data[("root", 2)] = md.to_bytes()
    with pytest.raises(UnsignedMetadataError):
        _device(tmp_path, world).refresh()


def test_release_key_rotation_resigns_the_targets_and_retires_the_old_keys() -> None:
    world = World()
    world.repo.commit_targets(world.sign_bundle(world.releases[:2], version="1.0.0")[0])
    pending, path = world.sign_bundle([world.releases[0]])
    fresh = [_signer(), _signer()]
    change = RootChange(release_keys=[k.public_key for k in fresh], release_threshold=2)
    v2 = next_root(world.current("root"), change, [world.root_key], expires=NOW + timedelta(365))
    with pytest.raises(PermissionDenied, match="resigned_targets"):
        world.repo.rotate_root(v2)  # the current targets do not verify under the new keys
    resigned = resign_targets(world.current("targets"), fresh, expires=EXPIRES)
    rotation = world.repo.rotate_root(v2, resigned_targets=resigned)
    assert (rotation.root_version, rotation.targets_version) == (2, 3)
    assert world.repo.release_signers() == tuple(sorted(k.public_key.keyid for k in fresh))
    assert _targets_paths(world.current("targets")) == {target_path_for("lane-assist", "1.0.0")}

    # The pending publication was built on targets v2: stale.
    with pytest.raises(Aborted):
        world.repo.add_signatures(pending, sign_pending(pending, fresh[:1]), target_path=path)
    old, path = world.sign_bundle(world.releases[:2])
    with pytest.raises(PermissionDenied, match="not a release key of root v2"):
        world.repo.review_targets(old, target_path=path)
    new, path = world.sign_bundle(fresh)
    world.repo.commit_targets(new)


def test_online_key_rotation_overlaps_old_and_new_keys_across_a_restart(tmp_path: Path) -> None:
    world = World()
    snapshot, timestamp, director = _signer(), _signer(), _signer()
    # Root v2 names old and new online keys: the running plane (old keys) still works.
    overlap = RootChange(
        snapshot_keys=[world.snapshot.public_key, snapshot.public_key],
        timestamp_keys=[world.timestamp.public_key, timestamp.public_key],
        director_keys=[world.director.public_key, director.public_key],
    )
    v2 = next_root(world.current("root"), overlap, [world.root_key], expires=NOW + timedelta(365))
    world.repo.rotate_root(v2)
    device = _device(tmp_path, world)
    device.refresh()

    # Restart with the new private keys: bootstrap from root v1 checks them against v2.
    restarted = world.repository(snapshot, timestamp)
    restarted.bootstrap(world.root_v1, create_initial_targets(world.releases, expires=EXPIRES))
    world.repo = restarted
    signed, path = world.sign_bundle(world.releases[:2])
    restarted.commit_targets(signed)  # snapshot and timestamp now by the new keys
    assert restarted.director_keys()[0].keys() == {
        world.director.public_key.keyid,
        director.public_key.keyid,
    }

    # Root v3 drops the old online keys; the old keys can no longer start a plane.
    final = RootChange(
        snapshot_keys=[snapshot.public_key],
        timestamp_keys=[timestamp.public_key],
        director_keys=[director.public_key],
    )
    v3 = next_root(world.current("root"), final, [world.root_key], expires=NOW + timedelta(365))
    restarted.rotate_root(v3)
    stale_plane = world.repository(world.snapshot, world.timestamp)
    with pytest.raises(FailedPrecondition, match="snapshot key"):
        stale_plane.bootstrap(
            world.root_v1, create_initial_targets(world.releases, expires=EXPIRES)
        )

    device = _device(tmp_path, world)
    device.refresh()
    assert device.get_targetinfo(path) is not None
    assert set(Metadata[Root].from_bytes(v3).signed.keys) == {
        world.root_key.public_key.keyid,
        *(k.public_key.keyid for k in world.releases),
        snapshot.public_key.keyid,
        timestamp.public_key.keyid,
        director.public_key.keyid,
    }


def test_a_root_counting_one_key_twice_is_refused() -> None:
    world = World()
    md = Metadata[Root].from_bytes(world.current("root"))
    key = world.releases[0].public_key
    alias = "f" * 64  # the same key under a second key id would count twice
    md.signed.version = 2
    md.signed.keys[alias] = type(key)(alias, key.keytype, key.scheme, dict(key.keyval))
    md.signed.roles["targets"].keyids.append(alias)
    md.sign(world.root_key)
    with pytest.raises(InvalidArgument, match="one key under two key ids"):
        world.repo.rotate_root(md.to_bytes())


def test_next_root_refuses_thresholds_it_cannot_meet_and_online_keys_that_are_offline() -> None:
    world = World()
    root = world.current("root")
    expires = NOW + timedelta(days=365)
    with pytest.raises(InvalidArgument, match="between 1 and the number of keys"):
        next_root(root, RootChange(release_threshold=4), [world.root_key], expires=expires)
    with pytest.raises(InvalidArgument, match="also a root or release key"):
        next_root(
            root,
            RootChange(snapshot_keys=[world.releases[0].public_key]),
            [world.root_key],
            expires=expires,
        )
    with pytest.raises(InvalidArgument, match="not one of the current or new root keys"):
        next_root(root, RootChange(), [world.releases[0]], expires=expires)


# -- keyring -----------------------------------------------------------------------------------


def test_keyring_with_a_release_threshold_and_the_default_single_keys(tmp_path: Path) -> None:
    paths = generate_keyring(tmp_path / "team", release_keys=3, release_threshold=2)
    assert [p.name for p in paths.release_keys] == [
        "release-1.pem",
        "release-2.pem",
        "release-3.pem",
    ]
    assert paths.release_key.name == "release-1.pem" and paths.root_key.name == "root.pem"
    assert KeyPaths.under(tmp_path / "team") == paths  # found again on disk
    root = Metadata[Root].from_bytes(paths.root_json.read_bytes()).signed
    assert root.roles["targets"].threshold == 2
    assert root.roles["targets"].keyids == [load_public_key(p).keyid for p in paths.release_keys]
    targets = Metadata[Targets].from_bytes(paths.targets_json.read_bytes())
    assert len(targets.signatures) == 3

    single = generate_keyring(tmp_path / "solo")
    assert single.release_keys == (tmp_path / "solo" / "offline" / "release.pem",)
    assert KeyPaths.under(tmp_path / "solo") == single
    with pytest.raises(InvalidArgument, match="between 1 and the number of release keys"):
        generate_keyring(tmp_path / "bad", release_keys=2, release_threshold=3)
