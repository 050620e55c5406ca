"""What a device checks of a desired state's envelope: DSSE signatures by the director keys.

DSSE (https://github.com/secure-systems-lab/dsse/blob/master/protocol.md) signs
``PAE(payloadType, payload)``, so the payload is verified exactly as received
and never re-serialised. The director's keys and threshold come from the
``x-ota-director`` field of the trusted TUF root. The control plane's
`ota.trust.director` signs with the same encoding.
"""

from __future__ import annotations

from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature  # type: ignore[attr-defined, unused-ignore]
from tuf.api.metadata import Root  # type: ignore[attr-defined, unused-ignore]

from ota.errors import VerificationError
from ota.v1 import common_pb2

DESIRED_STATE_TYPE = "application/vnd.ota.desired-state.v1+proto"
# The field of a TUF root naming the director's keys and threshold.
DIRECTOR_FIELD = "x-ota-director"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding of a payload and its type."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def open_envelope(
    envelope: common_pb2.Envelope,
    keys: dict[str, Key],
    threshold: int,
    *,
    payload_type: str = DESIRED_STATE_TYPE,
) -> bytes:
    """Return the payload if at least `threshold` distinct known keys signed it."""
    if envelope.payload_type != payload_type:
        raise VerificationError(
            "SIGNATURE_INVALID",
            f"envelope payload type is {envelope.payload_type!r}, expected {payload_type!r}",
        )
    if threshold < 1 or not keys:
        # A threshold of 0 would accept an unsigned envelope.
        raise VerificationError("SIGNATURE_INVALID", "no director key is trusted")
    message = pae(envelope.payload_type, envelope.payload)
    tried: set[str] = set()
    # Count keys, not keyids: one key listed under two ids must not count twice.
    verified: set[str] = set()
    for entry in envelope.signatures:
        key = keys.get(entry.keyid)
        if key is None or entry.keyid in tried:
            continue
        tried.add(entry.keyid)
        try:
            key.verify_signature(Signature(entry.keyid, entry.sig.hex()), message)
        except UnverifiedSignatureError:
            continue
        verified.add(_key_material(key))
    if len(verified) < threshold:
        raise VerificationError(
            "SIGNATURE_INVALID",
            f"desired state is signed by {len(verified)} of the {threshold} director keys required",
        )
    return bytes(envelope.payload)


def director_keys(root: Root) -> tuple[dict[str, Key], int]:
    """The director's keys and threshold named by a (verified) root."""
    spec: Any = root.unrecognized_fields.get(DIRECTOR_FIELD)
    try:
        keyids = spec["keyids"]
        threshold = spec["threshold"]
        if not isinstance(threshold, int) or not all(isinstance(k, str) for k in keyids):
            raise TypeError("keyids must be strings and threshold an integer")
        keys = {keyid: root.keys[keyid] for keyid in keyids}
    except (KeyError, TypeError) as exc:
        raise VerificationError(
            "METADATA_INVALID", f"root v{root.version} has no valid {DIRECTOR_FIELD}: {exc}"
        ) from exc
    return keys, threshold


def _key_material(key: Key) -> str:
    return f"{key.keytype}/{key.scheme}/{sorted(key.keyval.items())}"
