"""Page tokens (AIP-158): opaque, bound to the filter they were issued for, tamper-evident.

A token is ``base64(body) "." base64(digest)``. The digest makes an edited,
truncated or hand-made token an INVALID_ARGUMENT naming `page_token`, rather
than a silently different page. It is not a secret: tokens grant nothing,
since every page re-applies the caller's filter and authorisation, so any
replica (or a restarted server) accepts the tokens of another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

from ota.errors import InvalidArgument

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_DOMAIN = b"ota-page-token-v1\x00"


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def page_token(last_key: str, *, scope: str) -> str:
    body = json.dumps({"after": last_key, "scope": scope}, separators=(",", ":")).encode()
    return f"{_encode(body)}.{_encode(_digest(body))}"


def page_after(token: str, *, scope: str) -> str:
    """The key to continue after; a token from another filter, or altered, is refused."""
    if not token:
        return ""
    body_text, _, digest_text = token.partition(".")
    try:
        body = base64.urlsafe_b64decode(body_text.encode("ascii"))
        digest = base64.urlsafe_b64decode(digest_text.encode("ascii"))
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument("is not a token this server issued", field="page_token") from exc
    if not hmac.compare_digest(digest, _digest(body)):
        raise InvalidArgument("is not a token this server issued", field="page_token")
    try:
        data = json.loads(body)
        after, issued_for = str(data["after"]), str(data["scope"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("is not a token this server issued", field="page_token") from exc
    if issued_for != scope:
        raise InvalidArgument("was issued for a different filter", field="page_token")
    return after


def _digest(body: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + body).digest()[:16]


def _encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")
