"""Page tokens (AIP-158): opaque, and bound to the filter they were issued for."""

from __future__ import annotations

import base64
import binascii
import json

from ota.errors import InvalidArgument

DEFAULT_PAGE = 100
MAX_PAGE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("must not be negative", field="page_size")
    return min(requested or DEFAULT_PAGE, MAX_PAGE)


def page_token(last_key: str, *, scope: str) -> str:
    raw = json.dumps({"after": last_key, "scope": scope}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def page_after(token: str, *, scope: str) -> str:
    """The key to continue after; a token from another filter is refused."""
    if not token:
        return ""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, issued_for = str(data["after"]), str(data["scope"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument("is not a token this server issued", field="page_token") from exc
    if issued_for != scope:
        raise InvalidArgument("was issued for a different filter", field="page_token")
    return after
