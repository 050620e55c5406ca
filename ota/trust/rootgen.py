"""Offline trust anchors: the first root and the first (empty) targets metadata.

Runs on the release engineer's or security officer's machine, never on the
server. The director is not a TUF role: its key sits in ``root.signed.keys``
and an extra field ``x-ota-director`` names it, so the root keys sign it and a
root rotation rotates it. python-tuf keeps unknown fields of ``signed`` (they
are covered by the signatures) and keys no role uses.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from securesystemslib.signer import Signer, SSlibKey  # type: ignore[attr-defined, unused-ignore]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined, unused-ignore]

from ota.clock import utc
from ota.errors import InvalidArgument
from ota.trust.keys import sign_metadata

DIRECTOR_FIELD = "x-ota-director"


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
    offline = {key.keyid for key in [*root_keys, *release_keys]}
    for name, key in vars(online).items():
        if key.keyid in offline:
            # An online key that is also a release key would let a stolen control
            # plane sign bundles itself: the split the trust model rests on.
            raise InvalidArgument(
                f"the {name} key {key.keyid[:12]} is also a root or release key; "
                "online keys must be different keys",
                field=f"online.{name}",
            )

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


def create_initial_targets(release_signers: list[Signer], *, expires: datetime) -> bytes:
    """Empty targets metadata version 1, signed by each release key."""
    return sign_metadata(
        Metadata(Targets(version=1, expires=utc(expires))), release_signers, field="release_signers"
    )


def _check_threshold(field: str, threshold: int, keys: list[SSlibKey]) -> None:
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
