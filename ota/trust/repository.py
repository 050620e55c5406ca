"""The image repository: a TUF repository kept by the control plane.

Root and targets are signed offline (release engineers); this side holds the
online snapshot and timestamp keys. It accepts a new targets version only when
the trusted root's release keys signed it, then publishes snapshot and
timestamp over it. Versions come from the store; one process serialises its
own writes with a lock, and replicas rely on the store refusing a second
``(role, version)``.

A publication signed by fewer release keys than the threshold is reviewed
(`review_targets`) but not committed: the caller keeps it aside, collects more
signatures (`add_signatures`) and commits once the threshold is met. Every
signature must be a valid one by a release key of the current root; a key the
root does not name is refused outright rather than ignored.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import Key, Signature, Signer  # type: ignore[attr-defined, unused-ignore]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, Targets, Timestamp  # type: ignore[attr-defined, unused-ignore]
from tuf.api.serialization import DeserializationError

from ota.clock import Clock
from ota.device.envelope import DIRECTOR_FIELD
from ota.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    VerificationError,
)
from ota.signing.keys import sign_metadata
from ota.signing.release import check_custom, parse_targets
from ota.trust.director import director_keys
from ota.trust.served import ServedMetadata

ROLES = (Root.type, Timestamp.type, Snapshot.type, Targets.type)


class MetadataStore(Protocol):
    def get_metadata(self, role: str, version: int | None) -> bytes | None:
        """Stored bytes of `role` at `version` (None: the highest version), or None."""
        ...

    def put_metadata(self, role: str, version: int, content: bytes) -> None:
        """Store a new version; must refuse a `(role, version)` that already exists."""
        ...

    def latest_versions(self) -> dict[str, int]:
        """The highest stored version of each role that has one."""
        ...


@dataclass(frozen=True)
class AcceptedTarget:
    """A bundle as the release keys signed it."""

    path: str
    length: int
    sha256_hex: str
    custom: dict[str, Any]
    signer_keyids: tuple[str, ...]


@dataclass(frozen=True)
class Publication:
    """A new targets version that adds one bundle, with the release signatures it has so far."""

    target: AcceptedTarget
    targets_version: int
    threshold: int

    @property
    def complete(self) -> bool:
        """Whether the valid release signatures meet the targets threshold."""
        return len(self.target.signer_keyids) >= self.threshold

    @property
    def missing(self) -> int:
        return max(0, self.threshold - len(self.target.signer_keyids))


@dataclass(frozen=True)
class RootRotation:
    """What a root rotation left current."""

    root_version: int
    targets_version: int


class ImageRepository:
    """TUF metadata for the bundles, over a `MetadataStore`."""

    def __init__(
        self,
        store: MetadataStore,
        *,
        snapshot_signer: Signer,
        timestamp_signer: Signer,
        clock: Clock,
        snapshot_expiry: timedelta = timedelta(days=7),
        timestamp_expiry: timedelta = timedelta(days=1),
        on_root_rotated: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        # Told the version of each root stored by a rotation (and again when a rotation
        # is retried): caches that keep the next root's 404 are purged of it.
        self._on_root_rotated = on_root_rotated
        # Devices' reads come from memory; this class's own reads stay on the store.
        self._served = ServedMetadata(store)
        self._snapshot_signer = snapshot_signer
        self._timestamp_signer = timestamp_signer
        self._clock = clock
        self._snapshot_expiry = snapshot_expiry
        self._timestamp_expiry = timestamp_expiry
        self._lock = threading.Lock()

    # -- setting up -----------------------------------------------------------------

    def bootstrap(self, root: bytes, initial_targets: bytes) -> None:
        """Store root v1 and targets v1, then publish snapshot and timestamp; idempotent."""
        root_md = _parse_root(root, field="root")
        _verify_root(root_md, previous=None, field="root")
        targets_md = parse_targets(initial_targets, field="initial_targets")
        self._check_release_signatures(root_md.signed, targets_md, "initial_targets")
        if targets_md.signed.version != 1 or targets_md.signed.targets:
            raise InvalidArgument(
                "initial targets must be an empty version 1", field="initial_targets"
            )
        with self._lock:
            existing = self._store.get_metadata(Root.type, 1)
            if existing is not None and existing != root:
                raise FailedPrecondition(
                    "the repository is already bootstrapped with a different root", field="root"
                )
            # After a rotation the online keys are those of the newest root, not of v1.
            self._check_online_keys(self._root_md().signed if existing else root_md.signed)
            if existing is None:
                self._store.put_metadata(Root.type, 1, root)
            # Finish a bootstrap that stopped half-way (same root, missing roles).
            if self._store.get_metadata(Targets.type, None) is None:
                self._store.put_metadata(Targets.type, 1, initial_targets)
            if (
                self._store.get_metadata(Snapshot.type, None) is None
                or self._store.get_metadata(Timestamp.type, None) is None
            ):
                self._publish_snapshot()

    def rotate_root(
        self, new_root: bytes, *, resigned_targets: bytes | None = None
    ) -> RootRotation:
        """Store root N+1, signed by the thresholds of both root N and itself.

        When the release keys change, pass the current targets re-signed by the
        new release keys (version + 1, same bundles); they are committed with it.
        Uploading the current root again is a no-op, so a retried rotation succeeds.
        """
        with self._lock:
            new_md = _parse_root(new_root, field="new_root")
            if self._store.get_metadata(Root.type, new_md.signed.version) == new_root:
                self._rotated(new_md.signed.version)
                return RootRotation(new_md.signed.version, self._targets_md().signed.version)
            current = self._root_md()
            _verify_root(new_md, previous=current, field="new_root")
            if new_md.signed.is_expired(self._clock.now()):
                raise InvalidArgument(
                    f"root v{new_md.signed.version} expired at "
                    f"{new_md.signed.expires:%Y-%m-%dT%H:%M:%SZ}",
                    field="new_root",
                )
            self._check_online_keys(new_md.signed)
            targets = self._targets_md()
            resigned: Metadata[Targets] | None = None
            if resigned_targets is not None:
                resigned = parse_targets(resigned_targets, field="resigned_targets")
                self._check_release_signatures(new_md.signed, resigned, "resigned_targets")
                if (
                    resigned.signed.version != targets.signed.version + 1
                    or resigned.signed.targets != targets.signed.targets
                    or resigned.signed.is_expired(self._clock.now())
                ):
                    raise InvalidArgument(
                        f"must be version {targets.signed.version + 1} with the same bundles, "
                        "not expired",
                        field="resigned_targets",
                    )
            else:
                self._check_release_signatures(new_md.signed, targets, "resigned_targets")
            self._store.put_metadata(Root.type, new_md.signed.version, new_root)
            if resigned_targets is not None and resigned is not None:
                self._store.put_metadata(Targets.type, resigned.signed.version, resigned_targets)
                targets = resigned
            # Fresh snapshot and timestamp, signed by whatever the new root names.
            self._publish_snapshot()
            self._rotated(new_md.signed.version)
            return RootRotation(new_md.signed.version, targets.signed.version)

    def _rotated(self, root_version: int) -> None:
        if self._on_root_rotated is not None:
            self._on_root_rotated(root_version)

    # -- publishing bundles -----------------------------------------------------------

    def accept_targets(self, signed_targets: bytes, *, target_path: str) -> AcceptedTarget:
        """Verify a release engineer's new targets version that adds `target_path`.

        Nothing is stored: the caller checks the uploaded bytes, then commits.
        """
        with self._lock:
            md, _ = self._verify_next_targets(signed_targets)
        if target_path not in md.signed.targets:
            raise InvalidArgument(
                f"{target_path} is not in the signed targets", field="target_path"
            )
        return self._accepted(md, target_path, self._root_md().signed)

    def review_targets(self, signed_targets: bytes, *, target_path: str) -> Publication:
        """Check a new targets version that adds `target_path`, short of the threshold or not.

        Each signature must verify and come from a release key of the current
        root (PermissionDenied naming the key otherwise); the threshold is only
        reported (`Publication.complete`). Nothing is stored.
        """
        with self._lock:
            md = parse_targets(signed_targets, field="signed_targets")
            root = self._root_md().signed
            self._check_each_signature(root, md, md.signatures.values(), "signed_targets")
            self._check_next_targets(md)
            return self._publication(md, target_path, root)

    def add_signatures(
        self, signed_targets: bytes, signatures: list[Signature], *, target_path: str
    ) -> tuple[bytes, Publication]:
        """Add release signatures to a reviewed publication; return its bytes and state.

        A key that already signed counts once: its new signature replaces nothing.
        Aborted if another publication committed since (the targets moved on).
        """
        if not signatures:
            raise InvalidArgument("at least one signature is required", field="signatures")
        with self._lock:
            md = parse_targets(signed_targets, field="signed_targets")
            root = self._root_md().signed
            self._check_each_signature(root, md, signatures, "signatures")
            for signature in signatures:
                md.signatures.setdefault(signature.keyid, signature)
            self._check_next_targets(md)
            return md.to_bytes(), self._publication(md, target_path, root)

    def release_threshold(self) -> int:
        """How many release signatures the current root requires on targets."""
        return self._root_md().signed.roles[Targets.type].threshold

    def release_signers(self) -> tuple[str, ...]:
        """Release keys whose signatures on the current targets verify."""
        root = self._root_md().signed
        return self._check_release_signatures(root, self._targets_md(), "targets")

    def targets_version(self) -> int:
        """Version of the targets devices currently fetch."""
        return self._targets_md().signed.version

    def commit_targets(self, signed_targets: bytes) -> None:
        """Store accepted targets, then a snapshot and timestamp that point at them."""
        with self._lock:
            md, _ = self._verify_next_targets(signed_targets)
            self._store.put_metadata(Targets.type, md.signed.version, signed_targets)
            self._publish_snapshot()

    def refresh_timestamp(
        self, *, min_remaining: timedelta, writer: MetadataStore | None = None
    ) -> bool:
        """Re-sign timestamp (and snapshot) that expire within `min_remaining`; True if any.

        Also finishes a commit that stored targets but not yet its snapshot. The
        new metadata is stored through `writer` when given (the lease holder's
        fenced store, so a replica that lost the lease writes nothing).
        """
        with self._lock:
            now = self._clock.now()
            snapshot = self._online_md(Snapshot.type).signed
            targets_version = self._targets_md().signed.version
            if (
                snapshot.expires - now <= min_remaining
                or snapshot.meta["targets.json"].version != targets_version
            ):
                self._publish_snapshot(writer)
                return True
            if self._online_md(Timestamp.type).signed.expires - now <= min_remaining:
                self._publish_timestamp(writer)
                return True
            return False

    # -- reading ------------------------------------------------------------------------

    def metadata(self, role: str, version: int | None = None) -> bytes | None:
        """Stored metadata bytes as devices fetch them, or None."""
        if role not in ROLES:
            raise InvalidArgument(f"unknown TUF role {role!r}", field="role")
        if version is not None and version < 1:
            raise InvalidArgument("version must be at least 1", field="version")
        return self._served.get(role, version)

    def target(self, path: str) -> AcceptedTarget | None:
        """The bundle at `path` in the current targets, or None."""
        md = self._targets_md()
        if path not in md.signed.targets:
            return None
        return self._accepted(md, path, self._root_md().signed)

    def director_keys(self) -> tuple[dict[str, Key], int]:
        """Director keys and threshold named by the current root."""
        return director_keys(self._root_md().signed)

    # -- internals ------------------------------------------------------------------

    def _verify_next_targets(
        self, signed_targets: bytes
    ) -> tuple[Metadata[Targets], Metadata[Targets]]:
        md = parse_targets(signed_targets, field="signed_targets")
        root = self._root_md().signed
        self._check_release_signatures(root, md, "signed_targets")
        return md, self._check_next_targets(md)

    def _check_next_targets(self, md: Metadata[Targets]) -> Metadata[Targets]:
        """`md` is the current targets plus one well-formed bundle; return the current ones."""
        current = self._targets_md()
        if md.signed.version != current.signed.version + 1:
            raise Aborted(
                f"targets changed since you read it (signed v{md.signed.version}, current "
                f"v{current.signed.version}); fetch the current targets, re-sign and retry",
                field="signed_targets",
            )
        if md.signed.is_expired(self._clock.now()):
            raise InvalidArgument(
                f"signed targets expired at {md.signed.expires:%Y-%m-%dT%H:%M:%SZ}",
                field="signed_targets",
            )
        if md.signed.delegations is not None:
            raise InvalidArgument("delegations are not supported", field="signed_targets")
        for path, old in current.signed.targets.items():
            if md.signed.targets.get(path) != old:
                raise InvalidArgument(
                    f"the signed targets change or drop the published bundle {path}",
                    field="signed_targets",
                )
        added = sorted(set(md.signed.targets) - set(current.signed.targets))
        if len(added) > 1:
            raise InvalidArgument(
                f"publish one bundle at a time; the signed targets add {added}",
                field="signed_targets",
            )
        for path in added:
            check_custom(md.signed.targets[path].custom, path)
            if "sha256" not in md.signed.targets[path].hashes:
                raise InvalidArgument(f"{path} has no sha256 hash", field="signed_targets")
        return current

    def _check_each_signature(
        self, root: Root, md: Metadata[Targets], signatures: Iterable[Signature], field: str
    ) -> None:
        """Every signature is by a release key of `root` and verifies over `md`."""
        release = root.roles[Targets.type].keyids
        checked = 0
        for signature in signatures:
            checked += 1
            if signature.keyid not in release:
                raise PermissionDenied(
                    f"targets signed by key {signature.keyid} "
                    f"({_key_role(root, signature.keyid)}), which is not a release key of root v{root.version}; the release keys "
                    f"are {', '.join(k[:12] for k in release)}",
                    field=field,
                )
            try:
                root.get_key(signature.keyid).verify_signature(signature, md.signed_bytes)
            except (UnverifiedSignatureError, SslibVerificationError) as exc:
                raise PermissionDenied(
                    f"the signature by release key {signature.keyid} does not verify over "
                    "these targets: forged, or made over different metadata",
                    field=field,
                ) from exc
        if not checked:
            raise PermissionDenied("the targets carry no release signature", field=field)

    def _publication(self, md: Metadata[Targets], target_path: str, root: Root) -> Publication:
        added = set(md.signed.targets) - set(self._targets_md().signed.targets)
        if added != {target_path}:
            raise InvalidArgument(
                f"{target_path} is not the bundle the signed targets add", field="target_path"
            )
        result = root.get_verification_result(Targets.type, md.signed_bytes, md.signatures)
        info = md.signed.targets[target_path]
        return Publication(
            target=AcceptedTarget(
                path=target_path,
                length=info.length,
                sha256_hex=info.hashes.get("sha256", ""),
                custom=dict(info.custom or {}),
                signer_keyids=tuple(sorted(result.signed)),
            ),
            targets_version=md.signed.version,
            threshold=result.threshold,
        )

    def _check_release_signatures(
        self, root: Root, md: Metadata[Targets], field: str
    ) -> tuple[str, ...]:
        result = root.get_verification_result(Targets.type, md.signed_bytes, md.signatures)
        if not result.verified:
            release = set(root.roles[Targets.type].keyids)
            others = [_describe_key(root, k) for k in md.signatures if k not in release]
            detail = f"; also signed by {', '.join(others)}" if others else ""
            raise PermissionDenied(
                f"targets is signed by {len(result.signed)} of the {result.threshold} "
                f"release keys required{detail}",
                field=field,
            )
        return tuple(sorted(result.signed))

    def _accepted(self, md: Metadata[Targets], path: str, root: Root) -> AcceptedTarget:
        info = md.signed.targets[path]
        return AcceptedTarget(
            path=path,
            length=info.length,
            sha256_hex=info.hashes.get("sha256", ""),
            custom=dict(info.custom or {}),
            signer_keyids=self._check_release_signatures(root, md, "signed_targets"),
        )

    def _check_online_keys(self, root: Root) -> None:
        for role, signer in (
            (Snapshot.type, self._snapshot_signer),
            (Timestamp.type, self._timestamp_signer),
        ):
            spec = root.roles[role]
            keyid = signer.public_key.keyid
            if keyid not in spec.keyids or spec.threshold != 1:
                raise FailedPrecondition(
                    f"the control plane's {role} key {keyid[:12]} is not the {role} key "
                    f"of root v{root.version}; configure the matching online key",
                    field="root",
                )
        try:
            director_keys(root)
        except VerificationError as exc:
            raise InvalidArgument(exc.message, field="root") from exc

    def _publish_snapshot(self, writer: MetadataStore | None = None) -> None:
        targets = self._required(Targets.type)
        targets_version = parse_targets(targets, field="targets").signed.version
        snapshot = Snapshot(
            version=self._next_version(Snapshot.type),
            expires=self._clock.now() + self._snapshot_expiry,
            meta={"targets.json": _meta_file(targets_version, targets)},
        )
        data = sign_metadata(Metadata(snapshot), [self._snapshot_signer])
        (writer or self._store).put_metadata(Snapshot.type, snapshot.version, data)
        self._publish_timestamp(writer)

    def _publish_timestamp(self, writer: MetadataStore | None = None) -> None:
        snapshot = self._required(Snapshot.type)
        version = _parse(snapshot, Snapshot, field="snapshot").signed.version
        timestamp = Timestamp(
            version=self._next_version(Timestamp.type),
            expires=self._clock.now() + self._timestamp_expiry,
            snapshot_meta=_meta_file(version, snapshot),
        )
        data = sign_metadata(Metadata(timestamp), [self._timestamp_signer])
        (writer or self._store).put_metadata(Timestamp.type, timestamp.version, data)

    def _next_version(self, role: str) -> int:
        current = self._store.get_metadata(role, None)
        return 1 if current is None else _parse(current, None, field=role).signed.version + 1

    def _required(self, role: str) -> bytes:
        data = self._store.get_metadata(role, None)
        if data is None:
            raise FailedPrecondition(
                f"the image repository has no {role} metadata; bootstrap it first"
            )
        return data

    def _root_md(self) -> Metadata[Root]:
        return _parse_root(self._required(Root.type), field="root")

    def _targets_md(self) -> Metadata[Targets]:
        return parse_targets(self._required(Targets.type), field="targets")

    def _online_md(self, role: str) -> Metadata[Any]:
        return _parse(self._required(role), None, field=role)


def _parse(data: bytes, kind: type[Signed] | None, *, field: str) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as exc:
        raise InvalidArgument(
            f"not valid TUF metadata: {exc.__cause__ or exc}", field=field
        ) from exc
    if kind is not None and not isinstance(md.signed, kind):
        raise InvalidArgument(f"expected {kind.type} metadata, got {md.signed.type}", field=field)
    return md


def _parse_root(data: bytes, *, field: str) -> Metadata[Root]:
    md: Metadata[Root] = _parse(data, Root, field=field)
    return md


def _verify_root(md: Metadata[Root], *, previous: Metadata[Root] | None, field: str) -> None:
    """Root N+1 needs the thresholds of root N and of itself (TUF 5.3.4)."""
    new = md.signed
    if previous is None:
        if new.version != 1:
            raise InvalidArgument("the first root must be version 1", field=field)
    elif new.version != previous.signed.version + 1:
        raise Aborted(
            f"root changed: expected version {previous.signed.version + 1}, got {new.version}",
            field=field,
        )
    if previous is not None and new.consistent_snapshot != previous.signed.consistent_snapshot:
        raise InvalidArgument(
            "root rotation must keep consistent_snapshot as it is: devices fetch by it",
            field=field,
        )
    _check_distinct_keys(new, field=field)
    trusted = previous.signed if previous is not None else new
    try:
        trusted.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        new.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise PermissionDenied(
            f"root v{new.version} lacks root signatures: {exc}", field=field
        ) from exc


def _check_distinct_keys(root: Root, *, field: str) -> None:
    """One key listed under two key ids would count twice towards a threshold."""
    director = root.unrecognized_fields.get(DIRECTOR_FIELD, {}).get("keyids", [])
    for name, keyids in [*((n, r.keyids) for n, r in root.roles.items()), ("director", director)]:
        seen: dict[str, str] = {}
        for keyid in keyids:
            key = root.keys.get(keyid)
            if key is None:
                raise InvalidArgument(
                    f"the {name} role names key {keyid[:12]}, which the root does not list",
                    field=field,
                )
            value = f"{key.keytype}:{key.scheme}:{sorted(key.keyval.items())}"
            if value in seen:
                raise InvalidArgument(
                    f"the {name} role lists one key under two key ids ({seen[value][:12]}, "
                    f"{keyid[:12]}); a threshold must count distinct keys",
                    field=field,
                )
            seen[value] = keyid


def _meta_file(version: int, data: bytes) -> MetaFile:
    return MetaFile(version=version, length=len(data), hashes={"sha256": _sha256(data)})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key_role(root: Root, keyid: str) -> str:
    """What `keyid` is to `root`: "the snapshot key", "a key the root does not know"..."""
    roles = [name for name, role in root.roles.items() if keyid in role.keyids]
    if keyid in root.unrecognized_fields.get(DIRECTOR_FIELD, {}).get("keyids", []):
        roles.append("director")
    return f"the {'/'.join(roles)} key" if roles else "a key the root does not know"


def _describe_key(root: Root, keyid: str) -> str:
    return f"{keyid[:12]} ({_key_role(root, keyid)})"
