"""Offline trust anchors: the first root, the first (empty) targets, and root N+1.

Runs on the release engineer's or security officer's machine, never on the
server. A rotation (`next_root`) changes any role's keys and thresholds, and
is signed by the root keys of both the current and the new root; devices and
the server refuse it otherwise (TUF 5.3.4). The director is not a TUF role: its key sits in ``root.signed.keys``
and an extra field ``x-ota-director`` names it, so the root keys sign it and a
root rotation rotates it. python-tuf keeps unknown fields of ``signed`` (they
are covered by the signatures) and keys no role uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from securesystemslib.signer import Key, Signer, SSlibKey  # type: ignore[attr-defined, unused-ignore]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined, unused-ignore]
from tuf.api.serialization import DeserializationError

from ota.clock import utc
from ota.device.envelope import DIRECTOR_FIELD
from ota.errors import InvalidArgument
from ota.signing.keys import sign_metadata


@dataclass(frozen=True)
class OnlineKeys:
    """Public keys the control plane signs with: TUF snapshot and timestamp, and the director."""

    snapshot: SSlibKey
    timestamp: SSlibKey
    director: SSlibKey


def create_root(
    root_signers: list[Signer],
    root_keys: list[SSlibKey],
    release_keys: list[SSlibKey],
    online: OnlineKeys,
    *,
    root_threshold: int = 1,
    release_threshold: int = 1,
    expires: datetime,
) -> bytes:
    """Signed root.json version 1 (consistent snapshots) with the director key in it."""
    _check_threshold("root_threshold", root_threshold, root_keys)
    _check_threshold("release_threshold", release_threshold, release_keys)

    root = Root(version=1, expires=utc(expires), consistent_snapshot=True)
    for role, keys in (
        (Root.type, root_keys),
        (Targets.type, release_keys),
        (Snapshot.type, [online.snapshot]),
        (Timestamp.type, [online.timestamp]),
    ):
        for key in keys:
            root.add_key(key, role)
    root.roles[Root.type].threshold = root_threshold
    root.roles[Targets.type].threshold = release_threshold
    root.keys[online.director.keyid] = online.director
    root.unrecognized_fields[DIRECTOR_FIELD] = {
        "keyids": [online.director.keyid],
        "threshold": 1,
    }
    _check_online_apart(root)

    _check_signers(root_signers, root.roles[Root.type].keyids, "root_signers", "root")
    md = Metadata(root)
    signed = sign_metadata(md, root_signers, field="root_signers")
    try:
        root.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except UnsignedMetadataError as exc:
        raise InvalidArgument(
            f"not enough root keys signed: {exc}; need {root_threshold}", field="root_signers"
        ) from exc
    return signed


@dataclass(frozen=True)
class RootChange:
    """What root N+1 changes; None keeps the current keys or threshold of that role.

    Online roles (snapshot, timestamp, director) take a list so a rotation can
    name the old and the new key side by side while the control plane switches.
    """

    root_keys: Sequence[SSlibKey] | None = None
    root_threshold: int | None = None
    release_keys: Sequence[SSlibKey] | None = None
    release_threshold: int | None = None
    snapshot_keys: Sequence[SSlibKey] | None = None
    timestamp_keys: Sequence[SSlibKey] | None = None
    director_keys: Sequence[SSlibKey] | None = None


def next_root(
    current_root: bytes, change: RootChange, root_signers: list[Signer], *, expires: datetime
) -> bytes:
    """Signed root.json N+1: `current_root` with `change` applied.

    `root_signers` must meet the root threshold of the current root and of the
    new one (keys of both may be given; a key in both counts for both).
    """
    previous = parse_root(current_root, field="current_root")
    md = parse_root(current_root, field="current_root")
    root = md.signed
    root.version += 1
    root.expires = utc(expires)
    for role, keys in (
        (Root.type, change.root_keys),
        (Targets.type, change.release_keys),
        (Snapshot.type, change.snapshot_keys),
        (Timestamp.type, change.timestamp_keys),
    ):
        if keys is not None:
            if not keys:
                raise InvalidArgument(f"the {role} role needs at least one key", field=role)
            root.roles[role].keyids = list(dict.fromkeys(key.keyid for key in keys))
            root.keys.update({key.keyid: key for key in keys})
    if change.director_keys is not None:
        if not change.director_keys:
            raise InvalidArgument("the director needs at least one key", field="director")
        director = root.unrecognized_fields.setdefault(DIRECTOR_FIELD, {"threshold": 1})
        director["keyids"] = list(dict.fromkeys(key.keyid for key in change.director_keys))
        root.keys.update({key.keyid: key for key in change.director_keys})
    if change.root_threshold is not None:
        root.roles[Root.type].threshold = change.root_threshold
    if change.release_threshold is not None:
        root.roles[Targets.type].threshold = change.release_threshold
    for role, field in ((Root.type, "root_threshold"), (Targets.type, "release_threshold")):
        spec = root.roles[role]
        _check_threshold(field, spec.threshold, [root.keys[k] for k in spec.keyids])
    _check_online_apart(root)
    # Keys no role names any more leave the root.
    used = {k for spec in root.roles.values() for k in spec.keyids}
    used.update(root.unrecognized_fields.get(DIRECTOR_FIELD, {}).get("keyids", []))
    root.keys = {keyid: key for keyid, key in root.keys.items() if keyid in used}

    allowed = [*previous.signed.roles[Root.type].keyids, *root.roles[Root.type].keyids]
    _check_signers(root_signers, allowed, "root_signers", "current or new root")
    signed = sign_metadata(md, root_signers, field="root_signers")
    for name, trusted in (("current", previous.signed), ("new", root)):
        try:
            trusted.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        except UnsignedMetadataError as exc:
            raise InvalidArgument(
                f"root v{root.version} needs {trusted.roles[Root.type].threshold} signature(s) "
                f"by the {name} root keys (v{trusted.version}): {exc}",
                field="root_signers",
            ) from exc
    return signed


def parse_root(data: bytes, *, field: str) -> Metadata[Root]:
    """Root metadata from bytes, or InvalidArgument naming `field`."""
    try:
        md = Metadata[Root].from_bytes(data)
    except DeserializationError as exc:
        raise InvalidArgument(
            f"not valid TUF metadata: {exc.__cause__ or exc}", field=field
        ) from exc
    if not isinstance(md.signed, Root):
        raise InvalidArgument(f"expected root metadata, got {md.signed.type}", field=field)
    return md


def verify_root_chain(trusted_root: bytes, newer_roots: Sequence[bytes]) -> Metadata[Root]:
    """The newest of `newer_roots` (versions N+1, N+2, ...) each signed as TUF requires.

    What a device does on update, for an engineer about to sign root N+1 over
    what the server says root N is.
    """
    current = parse_root(trusted_root, field="trusted_root")
    for data in newer_roots:
        new = parse_root(data, field="root")
        if new.signed.version != current.signed.version + 1:
            raise InvalidArgument(
                f"expected root v{current.signed.version + 1}, got v{new.signed.version}",
                field="root",
            )
        try:
            current.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError as exc:
            raise InvalidArgument(
                f"the server's root v{new.signed.version} does not chain from your trusted "
                f"root: {exc}",
                field="root",
            ) from exc
        current = new
    return current


def create_initial_targets(release_signers: list[Signer], *, expires: datetime) -> bytes:
    """Empty targets metadata version 1, signed by each release key."""
    return sign_metadata(
        Metadata(Targets(version=1, expires=utc(expires))), release_signers, field="release_signers"
    )


def _check_online_apart(root: Root) -> None:
    # An online key that is also a root or release key would let a stolen control
    # plane sign bundles (or roots) itself: the split the trust model rests on.
    offline = {*root.roles[Root.type].keyids, *root.roles[Targets.type].keyids}
    online = [
        (Snapshot.type, root.roles[Snapshot.type].keyids),
        (Timestamp.type, root.roles[Timestamp.type].keyids),
        ("director", root.unrecognized_fields.get(DIRECTOR_FIELD, {}).get("keyids", [])),
    ]
    for name, keyids in online:
        for keyid in keyids:
            if keyid in offline:
                raise InvalidArgument(
                    f"the {name} key {keyid[:12]} is also a root or release key; "
                    "online keys must be different keys",
                    field=f"online.{name}",
                )


def _check_threshold(field: str, threshold: int, keys: Sequence[Key]) -> None:
    distinct = len({key.keyid for key in keys})
    if not 1 <= threshold <= distinct:
        raise InvalidArgument(
            f"threshold {threshold} must be between 1 and the number of keys ({distinct})",
            field=field,
        )


def _check_signers(signers: list[Signer], keyids: Iterable[str], field: str, role: str) -> None:
    allowed = set(keyids)
    for signer in signers:
        if signer.public_key.keyid not in allowed:
            raise InvalidArgument(
                f"signer {signer.public_key.keyid[:12]} is not one of the {role} keys", field=field
            )
