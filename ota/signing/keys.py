"""Signing keys on disk in standard formats.

A private key is an unencrypted PKCS#8 PEM file (mode 0600); its public half is
the securesystemslib / TUF key dict as JSON next to it (``NAME.pub.json``), with
the TUF default keyid (SHA-256 of the canonical key dict). Keys are Ed25519.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey  # type: ignore[attr-defined, unused-ignore]
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata

from ota.errors import AlreadyExists, InvalidArgument


def public_key_path(path: Path) -> Path:
    """Where the public half of the private key at `path` lives."""
    return path.with_suffix(".pub.json")


def generate_key(path: Path) -> SSlibKey:
    """Make an Ed25519 key: private PEM at `path`, public JSON beside it; return the public key."""
    pub_path = public_key_path(path)
    for existing in (path, pub_path):
        if existing.exists():
            # Overwriting a key silently would orphan every signature made with it.
            raise AlreadyExists(f"{existing} already exists; refusing to overwrite a key")
    signer = CryptoSigner.generate_ed25519()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_bytes)
    key = signer.public_key
    pub_path.write_text(json.dumps(key_to_json(key), indent=2, sort_keys=True) + "\n")
    return key


def key_to_json(key: SSlibKey) -> dict[str, Any]:
    """The public key as a JSON object: the TUF key dict plus its keyid."""
    return {"keyid": key.keyid, **key.to_dict()}


def load_signer(path: Path, *, field: str = "key") -> Signer:
    """A signer for the private PEM key at `path`; an error names `field`."""
    return _crypto_signer(path, field=field)


def _crypto_signer(path: Path, *, field: str = "key") -> CryptoSigner:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=field) from exc
    try:
        private_key = load_pem_private_key(data, password=None)
        return CryptoSigner(private_key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(
            f"cannot load a private signing key from {path}: {exc}", field=field
        ) from exc


def load_public_key(path: Path) -> SSlibKey:
    """The public key from a ``.pub.json`` file, or derived from a private PEM file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read public key {path}: {exc}", field="key") from exc
    if data.lstrip().startswith(b"-----BEGIN"):
        return _crypto_signer(path).public_key
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        claimed = doc.pop("keyid", None)
        keyid = default_keyid(doc)
        if claimed is not None and claimed != keyid:
            raise ValueError(f"keyid {claimed} does not match the key (expected {keyid})")
        return SSlibKey.from_dict(keyid, doc)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(
            f"{path} is not a public key in TUF key dict JSON: {exc}", field="key"
        ) from exc


def default_keyid(key_dict: dict[str, Any]) -> str:
    """The TUF default keyid: SHA-256 of the canonical JSON of keytype, scheme and keyval."""
    fields = {name: key_dict[name] for name in ("keytype", "scheme", "keyval")}
    canonical = encode_canonical(fields) or ""
    return hashlib.sha256(canonical.encode()).hexdigest()


def sign_metadata(md: Metadata[Any], signers: list[Signer], *, field: str = "signers") -> bytes:
    """Replace `md`'s signatures with one by each signer and return the serialised bytes."""
    if not signers:
        raise InvalidArgument("at least one signing key is required", field=field)
    md.signatures.clear()
    for signer in signers:
        try:
            md.sign(signer, append=True)
        except UnsignedMetadataError as exc:
            raise InvalidArgument(f"signing failed: {exc}", field=field) from exc
    return md.to_bytes()
