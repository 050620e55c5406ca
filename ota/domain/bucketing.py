"""`ota-bucket-v1`: which devices a stage exposes, computable by any firmware.

    msg = b"ota-bucket-v1\\x00" || u16be(len(salt)) || salt || u16be(len(uid)) || uid
    h   = first 8 bytes of SHA-256(msg), big-endian unsigned
    exposed(ppm) = h < (ppm << 64) // 1_000_000

Length-prefixed framing makes (salt "a", id "bc") and (salt "ab", id "c")
hash differently. Integer arithmetic only, so every platform agrees at the
edges: 0 ppm exposes nobody and 1 000 000 ppm everybody.
"""

from __future__ import annotations

import hashlib
import struct

from ota.errors import InvalidArgument

PPM_MAX = 1_000_000
HOLDOUT_MAX_PPM = 500_000
_DOMAIN = b"ota-bucket-v1\x00"
_SPACE = 1 << 64


def check_ppm(ppm: int, *, field: str = "ppm") -> int:
    if not 0 <= ppm <= PPM_MAX:
        raise InvalidArgument(f"must be between 0 and {PPM_MAX} ppm, got {ppm}", field=field)
    return ppm


def bucket_hash(salt: bytes, device_id: str) -> int:
    uid = device_id.encode("utf-8")
    if len(salt) > 0xFFFF or len(uid) > 0xFFFF:
        raise InvalidArgument("salt and device id must be shorter than 65536 bytes")
    msg = _DOMAIN + struct.pack(">H", len(salt)) + salt + struct.pack(">H", len(uid)) + uid
    return int.from_bytes(hashlib.sha256(msg).digest()[:8], "big")


def threshold(ppm: int) -> int:
    return (check_ppm(ppm) << 64) // PPM_MAX


def is_exposed(salt: bytes, device_id: str, ppm: int) -> bool:
    return bucket_hash(salt, device_id) < threshold(ppm)


def is_control(salt: bytes, device_id: str, holdout_ppm: int) -> bool:
    """In the holdout group: the top slice of hash space, disjoint from exposure."""
    if holdout_ppm > HOLDOUT_MAX_PPM:
        raise InvalidArgument(
            f"holdout may be at most {HOLDOUT_MAX_PPM} ppm, got {holdout_ppm}", field="holdout_ppm"
        )
    return bucket_hash(salt, device_id) >= _SPACE - threshold(holdout_ppm)
