"""Release engineer side: put a bundle into the targets metadata and sign it.

Runs where the release keys are (the CLI), never on the server. The server
re-checks everything here before it accepts the result.

With a threshold of k release keys, the first engineer signs with `add_target`
and the publication waits on the server; each further engineer fetches it,
checks it is exactly the bundle it claims to add (`review_pending`) and signs
the same canonical bytes (`sign_pending`), sending only the signature.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from securesystemslib.signer import Signature, Signer  # type: ignore[attr-defined, unused-ignore]
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined, unused-ignore]
from tuf.api.serialization import DeserializationError

from ota.clock import utc
from ota.domain.version import Version
from ota.errors import Aborted, InvalidArgument
from ota.signing.keys import sign_metadata
from ota.signing.rootgen import parse_root

# Feature names become path segments and topic-safe identifiers.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def target_path_for(feature: str, version: str) -> str:
    """The TUF target path of a feature bundle: ``features/<feature>/<version>.bundle``."""
    check_feature(feature)
    Version.parse(version)
    if not version.isascii():  # `\d` also matches other scripts' digits; paths stay ASCII
        raise InvalidArgument(f"{version!r} must use ASCII digits", field="version")
    return f"features/{feature}/{version}.bundle"


def check_feature(feature: str, *, field: str = "feature") -> str:
    if not _NAME.match(feature):
        raise InvalidArgument(
            f"{feature!r} is not a feature name: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 63 characters",
            field=field,
        )
    return feature


def check_custom(custom: Any, target_path: str) -> dict[str, Any]:
    """Validate a bundle's custom fields and that they match its target path."""
    if not isinstance(custom, dict):
        raise InvalidArgument("custom must be an object", field="custom")
    feature, version = custom.get("feature"), custom.get("version")
    if not isinstance(feature, str) or not isinstance(version, str):
        raise InvalidArgument("custom needs string 'feature' and 'version'", field="custom")
    check_feature(feature, field="custom.feature")
    Version.parse(version, field="custom.version")
    if target_path != target_path_for(feature, version):
        raise InvalidArgument(
            f"target path {target_path!r} does not match feature {feature!r} version "
            f"{version!r} (expected {target_path_for(feature, version)!r})",
            field="target_path",
        )
    models = custom.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        raise InvalidArgument(
            "custom.models must be a non-empty list of model names", field="custom.models"
        )
    min_firmware = custom.get("min_firmware")
    if min_firmware is not None:
        if not isinstance(min_firmware, str):
            raise InvalidArgument("must be a dotted version string", field="custom.min_firmware")
        Version.parse(min_firmware, field="custom.min_firmware")
    return custom


def parse_targets(data: bytes, *, field: str) -> Metadata[Targets]:
    """Targets metadata from bytes, or InvalidArgument naming `field`."""
    try:
        md = Metadata[Targets].from_bytes(data)
    except DeserializationError as exc:
        raise InvalidArgument(
            f"not valid TUF metadata: {exc.__cause__ or exc}", field=field
        ) from exc
    if not isinstance(md.signed, Targets):
        raise InvalidArgument(f"expected targets metadata, got {md.signed.type}", field=field)
    return md


def add_target(
    current_targets: bytes,
    *,
    target_path: str,
    length: int,
    sha256_hex: str,
    custom: dict[str, Any],
    signers: list[Signer],
    expires: datetime,
) -> bytes:
    """Next targets version: the current targets plus this bundle, signed by every signer."""
    md = parse_targets(current_targets, field="current_targets")
    if length < 1:
        raise InvalidArgument("a bundle must not be empty", field="length")
    if not _SHA256.match(sha256_hex):
        raise InvalidArgument("must be 64 lowercase hex digits", field="sha256_hex")
    check_custom(custom, target_path)
    new = TargetFile(length, {"sha256": sha256_hex}, target_path, {"custom": custom})
    existing = md.signed.targets.get(target_path)
    if existing is not None and existing != new:
        # Devices may already hold the old bytes under this path: a version is immutable.
        raise InvalidArgument(
            f"{target_path} is already published with different content; "
            "publish a new version instead",
            field="target_path",
        )
    md.signed.targets[target_path] = new
    md.signed.version += 1
    md.signed.expires = utc(expires)
    return sign_metadata(md, signers)


@dataclass(frozen=True)
class TargetClaim:
    """What a publication says it adds; checked against its metadata before signing."""

    target_path: str
    length: int
    sha256_hex: str
    custom: dict[str, Any]


@dataclass(frozen=True)
class PendingReview:
    """A pending targets version, checked: exactly the claimed bundle on top of the current ones."""

    target: TargetClaim
    targets_version: int
    expires: datetime
    # Release keys whose signatures verify so far, and how many the root requires.
    signer_keyids: tuple[str, ...]
    threshold: int
    release_keyids: tuple[str, ...]
    signed_sha256: str

    @property
    def missing(self) -> int:
        return max(0, self.threshold - len(self.signer_keyids))


def signed_digest(md: Metadata[Any]) -> str:
    """SHA-256 of the canonical signed part: what every signature on `md` covers."""
    return hashlib.sha256(md.signed_bytes).hexdigest()


def review_pending(
    pending: bytes,
    *,
    current_targets: bytes,
    root: bytes,
    claimed: TargetClaim,
    now: datetime,
) -> PendingReview:
    """Check a pending targets version before adding a signature to it.

    It must be the current targets plus exactly the claimed bundle (same path,
    length, sha256 and custom fields), one version up and not expired; anything
    else is refused, since a signature vouches for the whole file.
    """
    md = parse_targets(pending, field="pending_targets")
    current = parse_targets(current_targets, field="current_targets")
    root_md = parse_root(root, field="root")
    if md.signed.version != current.signed.version + 1:
        raise Aborted(
            f"the pending targets are version {md.signed.version} but the published targets "
            f"are already version {current.signed.version}: another publication went first. "
            "Re-publish this bundle (`ota bundle publish`) to re-base it; signatures made so "
            "far cannot carry over",
            field="pending_targets",
        )
    if md.signed.is_expired(now):
        raise InvalidArgument(
            f"the pending targets expired at {md.signed.expires:%Y-%m-%dT%H:%M:%SZ}; "
            "re-publish the bundle",
            field="pending_targets",
        )
    if md.signed.delegations is not None:
        raise InvalidArgument("delegations are not supported", field="pending_targets")
    for path, old in current.signed.targets.items():
        if md.signed.targets.get(path) != old:
            raise InvalidArgument(
                f"the pending targets change or drop the published bundle {path}; do not sign them",
                field="pending_targets",
            )
    added = sorted(set(md.signed.targets) - set(current.signed.targets))
    if added != [claimed.target_path]:
        raise InvalidArgument(
            f"the pending targets add {added or 'nothing'}, not {claimed.target_path}; "
            "do not sign them",
            field="pending_targets",
        )
    info = md.signed.targets[claimed.target_path]
    found = TargetClaim(
        target_path=info.path,
        length=info.length,
        sha256_hex=info.hashes.get("sha256", ""),
        custom=check_custom(info.custom, info.path),
    )
    differences = [
        name for name in ("length", "sha256_hex") if getattr(found, name) != getattr(claimed, name)
    ]
    differences += [
        f"custom.{key}"
        for key in sorted(set(found.custom) | set(claimed.custom))
        if found.custom.get(key) != claimed.custom.get(key)
    ]
    if differences:
        raise InvalidArgument(
            f"the pending targets disagree with what the publication claims "
            f"({', '.join(differences)}); do not sign them",
            field="pending_targets",
        )
    result = root_md.signed.get_verification_result(Targets.type, md.signed_bytes, md.signatures)
    return PendingReview(
        target=found,
        targets_version=md.signed.version,
        expires=md.signed.expires,
        signer_keyids=tuple(sorted(result.signed)),
        threshold=result.threshold,
        release_keyids=tuple(root_md.signed.roles[Targets.type].keyids),
        signed_sha256=signed_digest(md),
    )


def check_file(claim: TargetClaim, data: bytes) -> None:
    """The local copy of the bundle is byte for byte what the metadata describes."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != claim.length or digest != claim.sha256_hex:
        raise InvalidArgument(
            f"your file ({len(data)} bytes, sha256 {digest[:16]}) is not the bundle the pending "
            f"targets describe ({claim.length} bytes, sha256 {claim.sha256_hex[:16]}); "
            "do not sign them",
            field="file",
        )


def sign_pending(pending: bytes, signers: list[Signer]) -> list[Signature]:
    """One signature per signer over the canonical signed part of the pending targets."""
    if not signers:
        raise InvalidArgument("at least one release key (--key) is required", field="key")
    md = parse_targets(pending, field="pending_targets")
    return [signer.sign(md.signed_bytes) for signer in signers]


def resign_targets(current_targets: bytes, signers: list[Signer], *, expires: datetime) -> bytes:
    """The current targets as the next version, same bundles, signed by (new) release keys."""
    md = parse_targets(current_targets, field="current_targets")
    md.signed.version += 1
    md.signed.expires = utc(expires)
    return sign_metadata(md, signers, field="release_key")
