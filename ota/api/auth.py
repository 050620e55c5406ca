"""Who may call what: bearer tokens with roles, device credentials, default deny.

Operators present `authorization: Bearer <token>`; the token maps to a role
(admin, release, viewer). Tokens come from the config (the bootstrap admin)
or from the database (`TokenService`), where only their digest is kept and
a revocation takes effect on the next call, on every replica. Devices present `Bearer device:<device_id>:<secret>`
and reach only the device methods, and only for themselves (servicers check
the device id with `caller_device`). A method missing from `METHOD_ROLES` is
denied to everyone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import grpc

from ota.api.credentials import CredentialChecks
from ota.clock import Clock, SystemClock
from ota.errors import PermissionDenied, Unauthenticated
from ota.store import fleet
from ota.store import tokens as api_tokens
from ota.store.session import Store

ADMIN, RELEASE, VIEWER, DEVICE = "admin", "release", "viewer", "device"
OPERATORS = frozenset({ADMIN, RELEASE, VIEWER})
WRITERS = frozenset({ADMIN, RELEASE})
_ALL = OPERATORS | {DEVICE}

_B, _R, _F, _P, _T, _W, _A = (
    "/ota.v1.BundleService/",
    "/ota.v1.RolloutService/",
    "/ota.v1.FleetService/",
    "/ota.v1.ReportService/",
    "/ota.v1.TokenService/",
    "/ota.v1.WebhookService/",
    "/ota.v1.AuditService/",
)

METHOD_ROLES: dict[str, frozenset[str]] = {
    _B + "PublishBundle": WRITERS,
    _B + "GetBundle": OPERATORS,
    _B + "ListBundles": OPERATORS,
    _B + "GetPendingTargets": OPERATORS,
    _B + "SignBundle": WRITERS,
    _B + "DiscardPendingBundle": WRITERS,
    _B + "RotateRoot": frozenset({ADMIN}),
    _B + "GetMetadata": _ALL,
    _B + "GetDesiredState": frozenset({ADMIN, DEVICE}),
    _B + "DownloadBundle": _ALL,
    _R + "CreateRollout": WRITERS,
    _R + "GetRollout": OPERATORS,
    _R + "ListRollouts": OPERATORS,
    _R + "StartRollout": WRITERS,
    _R + "PauseRollout": WRITERS,
    _R + "ResumeRollout": WRITERS,
    _R + "PromoteRollout": WRITERS,
    _R + "AbortRollout": WRITERS,
    _R + "RollbackRollout": WRITERS,
    _R + "KillRollout": WRITERS,
    _R + "EditRollout": WRITERS,
    _R + "DeleteRollout": WRITERS,
    _R + "PlanRollout": OPERATORS,
    _R + "ListRolloutEvents": OPERATORS,
    _R + "WatchRollout": OPERATORS,
    _F + "RegisterDevices": frozenset({ADMIN}),
    _F + "ListDevices": OPERATORS,
    _F + "GetDevice": OPERATORS,
    _F + "RevokeDevice": frozenset({ADMIN}),
    _P + "GetRolloutReport": OPERATORS,
    _P + "GetFeatureReport": OPERATORS,
    _T + "CreateToken": frozenset({ADMIN}),
    _T + "ListTokens": frozenset({ADMIN}),
    _T + "RevokeToken": frozenset({ADMIN}),
    # Endpoints and their secrets reach outside the system: admins only, reads too.
    _W + "CreateWebhook": frozenset({ADMIN}),
    _W + "ListWebhooks": frozenset({ADMIN}),
    _W + "DeleteWebhook": frozenset({ADMIN}),
    _W + "TestWebhook": frozenset({ADMIN}),
    _W + "ListDeliveries": frozenset({ADMIN}),
    _W + "Redeliver": frozenset({ADMIN}),
    # Who did what from where, tokens and devices included: admins only.
    _A + "ListAuditEntries": frozenset({ADMIN}),
}
# Verified device credentials are trusted this long without the database. The
# replica that revokes a device forgets it at once; other replicas within this.
DEVICE_CACHE_SECONDS = 30.0
# Health and reflection are open: load balancers and grpcurl call them unauthenticated.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Caller:
    role: str
    name: str  # the operator role's actor name, or the device id


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text.removeprefix("Bearer ").strip()
    return ""


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The device a device token names (the interceptor already verified it)."""
    token = bearer(context.invocation_metadata())
    if token.startswith("device:"):
        return Caller(DEVICE, token.split(":", 2)[1])
    return Caller(ADMIN, "operator")


class Authenticator:
    """Resolves tokens to callers; caches device secrets it has verified."""

    def __init__(self, store: Store, tokens: dict[str, str], clock: Clock | None = None) -> None:
        self._store = store
        self._clock = clock or SystemClock()
        # token -> "role" or "role:name" (the name is what the audit log shows)
        self._tokens = dict(tokens)
        # device token -> (device id, monotonic time the entry stops being trusted)
        self._verified: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._credentials = CredentialChecks(self._read_digests)

    def forget_device(self, device_id: str) -> None:
        with self._lock:
            self._verified = {t: e for t, e in self._verified.items() if e[0] != device_id}

    def authenticate(self, token: str) -> Caller:
        if not token:
            raise Unauthenticated("missing bearer token; pass --token or set OTA_TOKEN")
        entry = self._tokens.get(token)
        if entry is not None:
            role, _, name = entry.partition(":")
            return Caller(role, name or role)
        if token.startswith("device:"):
            with self._lock:
                cached = self._verified.get(token)
            if cached is not None and cached[1] > time.monotonic():
                return Caller(DEVICE, cached[0])
            parts = token.split(":", 2)
            if len(parts) == 3 and self._credentials.check(parts[1], parts[2]):
                with self._lock:
                    expires = time.monotonic() + DEVICE_CACHE_SECONDS
                    self._verified[token] = (parts[1], expires)
                return Caller(DEVICE, parts[1])
        elif token.startswith(api_tokens.PREFIX):
            # Not cached: a revocation must hold on the very next call, on every replica.
            with self._store.transaction() as session:
                row = api_tokens.authenticate(session, token, self._clock.now())
            if row is not None:
                if api_tokens.expired(row, self._clock.now()):
                    raise Unauthenticated(
                        f"token expired at {row.expires_at:%Y-%m-%d %H:%M:%S}Z "
                        f"(token {row.token_id}); ask an admin for a new one"
                    )
                return Caller(row.role, row.display_name)
        raise Unauthenticated("the bearer token is not valid")

    def _read_digests(self, device_ids: Collection[str]) -> dict[str, str]:
        with self._store.transaction() as session:
            return fleet.valid_secret_digests(session, device_ids)

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """Who is calling, for the audit log: the token's name, else its role."""
        return self.authenticate(bearer(context.invocation_metadata()))

    def authorize(self, method: str, token: str) -> Caller | None:
        if method.startswith(PUBLIC_PREFIXES):
            return None
        allowed = METHOD_ROLES.get(method)
        caller = self.authenticate(token)
        if allowed is None or caller.role not in allowed:
            raise PermissionDenied(f"{caller.role} may not call {method.rsplit('/', 1)[-1]}")
        return caller


def require_device_self(context: grpc.ServicerContext, device_id: str) -> None:
    caller = caller_of(context)
    if caller.role == DEVICE and caller.name != device_id:
        # Same answer whether or not the other device exists.
        raise PermissionDenied("a device may only read its own desired state", field="device_id")


AuthorizeFn = Callable[[str, str], Caller | None]
