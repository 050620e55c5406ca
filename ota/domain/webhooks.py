"""Webhooks, the pure part: event types, which audit action is which event, who
subscribes to what, endpoint rules and the retry schedule.

Deliveries follow the Standard Webhooks convention (https://www.standardwebhooks.com):
`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">` under a `whsec_` secret; the body is
`{"type": ..., "timestamp": ..., "data": {...}}`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ota.errors import InvalidArgument

ROLLOUT_CREATED = "rollout.created"
ROLLOUT_STARTED = "rollout.started"
ROLLOUT_STAGE_ADVANCED = "rollout.stage_advanced"
ROLLOUT_GATE_BREACHED = "rollout.gate_breached"
ROLLOUT_GATE_TRIPPED = "rollout.gate_tripped"
ROLLOUT_PAUSED = "rollout.paused"
ROLLOUT_RESUMED = "rollout.resumed"
ROLLOUT_COMPLETED = "rollout.completed"
ROLLOUT_ABORTED = "rollout.aborted"
ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
ROLLOUT_KILLED = "rollout.killed"
BUNDLE_PUBLISHED = "bundle.published"
BUNDLE_PENDING_SIGNATURE = "bundle.pending_signature"
BUNDLE_DISCARDED = "bundle.discarded"
KEYS_ROTATED = "keys.rotated"
# Sent only by `ota webhooks test`, to one endpoint, outside the outbox.
WEBHOOK_TEST = "webhook.test"

EVENT_TYPES: tuple[str, ...] = (
    ROLLOUT_CREATED,
    ROLLOUT_STARTED,
    ROLLOUT_STAGE_ADVANCED,
    ROLLOUT_GATE_BREACHED,
    ROLLOUT_GATE_TRIPPED,
    ROLLOUT_PAUSED,
    ROLLOUT_RESUMED,
    ROLLOUT_COMPLETED,
    ROLLOUT_ABORTED,
    ROLLOUT_ROLLED_BACK,
    ROLLOUT_KILLED,
    BUNDLE_PUBLISHED,
    BUNDLE_PENDING_SIGNATURE,
    BUNDLE_DISCARDED,
    KEYS_ROTATED,
)

# Audit action of a rollout -> the event it is. Actions not listed (expose, edit,
# promote, the phases of waiting) are not events.
_ROLLOUT_ACTIONS = {
    "create": ROLLOUT_CREATED,
    "start": ROLLOUT_STARTED,
    "advance": ROLLOUT_STAGE_ADVANCED,
    "gate-observed": ROLLOUT_GATE_BREACHED,
    "held": ROLLOUT_GATE_BREACHED,
    "pause": ROLLOUT_PAUSED,
    "resume": ROLLOUT_RESUMED,
    "complete": ROLLOUT_COMPLETED,
    "abort": ROLLOUT_ABORTED,
    "rollback": ROLLOUT_ROLLED_BACK,
    "kill": ROLLOUT_KILLED,
}

DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_DEAD = "pending", "delivered", "dead"
DELIVERY_STATES = (DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_DEAD)


def rollout_events(action: str, diff: dict[str, Any] | None) -> list[str]:
    """The events one rollout audit entry is: none, one, or a trip and its outcome.

    A pause or rollback that carries gate figures is a gate's doing: it is
    announced as `rollout.gate_tripped`, then as the state it led to.
    """
    event = _ROLLOUT_ACTIONS.get(action)
    if event is None:
        return []
    if action in ("pause", "rollback") and diff and "figures" in diff:
        return [ROLLOUT_GATE_TRIPPED, event]
    return [event]


@dataclass(frozen=True)
class Subscription:
    """What one endpoint wants: every event, or some types; of everything, a feature or a rollout."""

    event_types: tuple[str, ...] = ()
    feature: str = ""
    rollout_id: str = ""

    def wants(self, event_type: str, *, feature: str, rollout_id: str) -> bool:
        if self.event_types and event_type not in self.event_types:
            return False
        if self.feature and self.feature != feature:
            return False
        return not (self.rollout_id and self.rollout_id != rollout_id)


def check_event_types(types: Sequence[str]) -> tuple[str, ...]:
    """Event types named by a subscription ("*" or none = all), deduplicated in order."""
    chosen: list[str] = []
    for name in types:
        if name == "*":
            return ()
        if name not in EVENT_TYPES:
            raise InvalidArgument(
                f"{name!r} is not an event type; one of: {', '.join(EVENT_TYPES)}",
                field="webhook.event_types",
            )
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
MAX_URL = 2000


def check_url(url: str, *, allow_http: bool) -> str:
    """An endpoint URL: HTTPS; plain HTTP only to a loopback host, and only when allowed."""
    url = url.strip()
    if not url:
        raise InvalidArgument("is required", field="webhook.url")
    if len(url) > MAX_URL:
        raise InvalidArgument(f"is longer than {MAX_URL} characters", field="webhook.url")
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number fails here
    except ValueError as exc:
        raise InvalidArgument(f"{url!r} is not a URL: {exc}", field="webhook.url") from exc
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http"):
        raise InvalidArgument(f"{url!r} is not an https:// URL", field="webhook.url")
    if parts.username or parts.password:
        raise InvalidArgument("must not carry a user or password", field="webhook.url")
    if parts.scheme == "http" and not (allow_http and _is_loopback(host)):
        raise InvalidArgument(
            "must be https://; plain http:// is accepted only to a loopback address, "
            "and only when the server allows it (webhook_allow_http)",
            field="webhook.url",
        )
    return url


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, then the dead-letter list.

    Attempt n (1-based) that failed waits base * 2^(n-1), capped, then a random
    half of it is kept or not ("equal jitter"): spread out, never near zero.
    """

    base_seconds: float = 5.0
    max_seconds: float = 3600.0
    max_attempts: int = 12

    def delay_after(self, attempts: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.max_seconds, self.base_seconds * 2.0 ** max(0, attempts - 1))
        return ceiling / 2 + (rng or _RNG).uniform(0, ceiling / 2)

    def gives_up_after(self, attempts: int) -> bool:
        return attempts >= self.max_attempts


def ordering_key(*, rollout_id: str = "", bundle: str = "", other: str = "") -> str:
    """Events of one key reach an endpoint in the order they were committed."""
    if rollout_id:
        return f"rollout:{rollout_id}"
    if bundle:
        return f"bundle:{bundle}"
    return other or "global"


def states_of(names: Collection[str]) -> tuple[str, ...]:
    for name in names:
        if name not in DELIVERY_STATES:
            raise InvalidArgument(
                f"{name!r} is not one of {', '.join(DELIVERY_STATES)}", field="state"
            )
    return tuple(names)
