"""Release engineer side: put a bundle into the targets metadata and sign it.

Runs where the release keys are (the CLI), never on the server. The server
re-checks everything here before it accepts the result.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from securesystemslib.signer import Signer  # type: ignore[attr-defined, unused-ignore]
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined, unused-ignore]
from tuf.api.serialization import DeserializationError

from ota.clock import utc
from ota.domain.version import Version
from ota.errors import InvalidArgument
from ota.trust.keys import sign_metadata

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
