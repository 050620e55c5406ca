"""Who may call what: bearer tokens with roles, device credentials, default deny.

Operators present `authorization: Bearer <token>`; the token maps to a role
(admin, release, viewer). Tokens come from the config (the bootstrap admin)
or from the database (`TokenService`), where only their digest is kept. A
verified token is kept in memory for at most `token_cache_seconds`; its
revocation is announced on commit (`ota.store.changes`), so it is refused on
the next call on the replica that revoked it and, on the others, once the
notice arrives (PostgreSQL NOTIFY; a replica that cannot hear notices keeps
no token). Expiry is checked on every call. Devices present
`Bearer device:<device_id>:<secret>`, or, with no bearer token, a client
certificate of the device CA over mutual TLS: its common name is the device
id, and only the serial the database records as the device's current one is
honoured. Devices reach only the device methods, and only for themselves
(servicers check the device id with `require_device_self`). A method missing
from `METHOD_ROLES` is denied to everyone; `OPEN_METHODS` need no caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from ota.api.credentials import CredentialChecks
from ota.clock import Clock, SystemClock, utc
from ota.errors import PermissionDenied, Unauthenticated
from ota.store import changes, fleet
from ota.store import tokens as api_tokens
from ota.store.session import Store
from ota.trust.device_ca import DeviceCa

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
    _R + "ListRolloutDevices": OPERATORS,
    _R + "WatchRollout": OPERATORS,
    _F + "RegisterDevices": frozenset({ADMIN}),
    _F + "ListDevices": OPERATORS,
    _F + "GetDevice": OPERATORS,
    _F + "RevokeDevice": frozenset({ADMIN}),
    _F + "RenewCertificate": frozenset({DEVICE}),
    _F + "SignDeviceCsr": frozenset({ADMIN}),
    _F + "GetDeviceCrl": OPERATORS,
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
# Verified API tokens are trusted this long without the database (by default).
# Revocations are announced (module docstring), so this only bounds a change
# nobody announced (a row edited by hand); expiry is checked on every call.
TOKEN_CACHE_SECONDS = 10.0
# Health and reflection are open: load balancers and grpcurl call them unauthenticated.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A device enrolling has no credential yet: the servicer checks its one-time token.
OPEN_METHODS = frozenset({_F + "EnrollDevice"})


@dataclass(frozen=True)
class Caller:
    role: str
    name: str  # the operator role's actor name, or the device id


@dataclass(frozen=True)
class _VerifiedToken:
    token_id: str
    caller: Caller
    expires_at: datetime | None
    last_used: datetime  # as recorded: the database is asked again when it is due
    trusted_until: float  # monotonic


def _expired(token_id: str, expires_at: datetime) -> Unauthenticated:
    return Unauthenticated(
        f"token expired at {expires_at:%Y-%m-%d %H:%M:%S}Z "
        f"(token {token_id}); ask an admin for a new one"
    )


def bearer(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            if text.startswith("Bearer "):
                return text.removeprefix("Bearer ").strip()
    return ""


def peer_certificate(context: grpc.ServicerContext) -> bytes | None:
    """The client certificate presented over mutual TLS (PEM), if any."""
    values = _auth_values(context, "x509_pem_cert")
    return values[0] if values else None


def _auth_values(context: grpc.ServicerContext, key: str) -> list[bytes]:
    # grpc-stubs types the auth context loosely; grpcio gives lists of bytes.
    values: Any = context.auth_context().get(key)
    return [bytes(v) for v in values] if values else []


def caller_of(context: grpc.ServicerContext) -> Caller:
    """The device a device token or certificate names (the interceptor already verified it)."""
    token = bearer(context.invocation_metadata())
    if token.startswith("device:"):
        return Caller(DEVICE, token.split(":", 2)[1])
    if not token:
        names = _auth_values(context, "x509_common_name")
        if names:
            return Caller(DEVICE, names[0].decode())
    return Caller(ADMIN, "operator")


class Authenticator:
    """Resolves tokens to callers; caches device secrets it has verified."""

    def __init__(
        self,
        store: Store,
        tokens: dict[str, str],
        clock: Clock | None = None,
        *,
        device_ca: DeviceCa | None = None,
        token_cache_seconds: float = TOKEN_CACHE_SECONDS,
    ) -> None:
        self._store = store
        self._token_cache_seconds = token_cache_seconds
        self._device_ca = device_ca
        self._clock = clock or SystemClock()
        # token -> "role" or "role:name" (the name is what the audit log shows)
        self._tokens = dict(tokens)
        # device token -> (device id, monotonic time the entry stops being trusted)
        self._verified: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        # API token -> what it was verified as; `_token_epoch` moves on every
        # forgetting, so a check that raced a revocation does not keep its answer.
        self._known_tokens: dict[str, _VerifiedToken] = {}
        self._token_epoch = 0
        self._keep_tokens = True
        # This process's revocations arrive here when they commit; other replicas'
        # by `ota.api.freshness`.
        changes.subscribe(store.engine, changes.TOKENS, self.forget_tokens)
        self._credentials = CredentialChecks(self._read_digests)
        self._certificates = CredentialChecks(self._read_serials)

    def forget_tokens(self, token_ids: Collection[str]) -> None:
        """Revoked: the next call with any of them goes to the database."""
        with self._lock:
            self._token_epoch += 1
            self._known_tokens = {
                t: v for t, v in self._known_tokens.items() if v.token_id not in token_ids
            }

    def set_live(self, live: bool) -> None:
        """Whether revocations on other replicas reach this one; while not, keep no token."""
        with self._lock:
            self._token_epoch += 1
            self._keep_tokens = live
            self._known_tokens = {}

    def forget_device(self, device_id: str) -> None:
        with self._lock:
            self._verified = {t: e for t, e in self._verified.items() if e[0] != device_id}

    def authenticate(self, token: str, certificate: bytes | None = None) -> Caller:
        if not token and certificate is not None and self._device_ca is not None:
            return self._device_by_certificate(certificate)
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
            caller = self._operator(token)
            if caller is not None:
                return caller
        raise Unauthenticated("the bearer token is not valid")

    def device_of_certificate(self, certificate: bytes) -> str:
        """The device whose current certificate this is (PEM), as for a gRPC call.

        The delivery origin asks this on every HTTP request of a device."""
        if self._device_ca is None:
            raise Unauthenticated("this control plane has no device CA")
        return self._device_by_certificate(certificate).name

    def _operator(self, token: str) -> Caller | None:
        """The caller an API token stands for; None if unknown or revoked."""
        now = self._clock.now()
        known = self._known_tokens.get(token)
        if (
            known is not None
            and known.trusted_until > time.monotonic()
            and now - known.last_used < api_tokens.LAST_USED_RESOLUTION
        ):
            if known.expires_at is not None and now >= known.expires_at:
                raise _expired(known.token_id, known.expires_at)
            return known.caller
        with self._lock:
            epoch, keep = self._token_epoch, self._keep_tokens
        with self._store.transaction() as session:
            row = api_tokens.authenticate(session, token, now)
        if row is None:
            return None
        if row.expires_at is not None and api_tokens.expired(row, now):
            raise _expired(row.token_id, utc(row.expires_at))
        caller = Caller(row.role, row.display_name)
        if keep:
            verified = _VerifiedToken(
                row.token_id,
                caller,
                utc(row.expires_at) if row.expires_at is not None else None,
                utc(row.last_used_at) if row.last_used_at is not None else now,
                time.monotonic() + self._token_cache_seconds,
            )
            with self._lock:
                if self._token_epoch == epoch:
                    self._known_tokens[token] = verified
        return caller

    def _device_by_certificate(self, certificate: bytes) -> Caller:
        assert self._device_ca is not None
        # The TLS layer checked the chain against the wall clock; the CA check here
        # refuses an operator's client certificate, and the clock the control
        # plane runs on decides expiry.
        peer = self._device_ca.peer(certificate)
        if peer.not_after <= self._clock.now():
            raise Unauthenticated("the device certificate has expired; enroll again")
        # Not cached: a revocation or renewal holds on the very next call, on every
        # replica. Concurrent checks share one read (`CredentialChecks`).
        if self._certificates.value(peer.device_id) != peer.serial:
            # Revoked, renewed since, or another device's: the same answer for each.
            raise Unauthenticated("the device certificate is not the device's current one")
        return Caller(DEVICE, peer.device_id)

    def _read_digests(self, device_ids: Collection[str]) -> dict[str, str]:
        with self._store.transaction() as session:
            return fleet.valid_secret_digests(session, device_ids)

    def _read_serials(self, device_ids: Collection[str]) -> dict[str, str]:
        with self._store.transaction() as session:
            return fleet.valid_certificates(session, device_ids)

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """Who is calling, for the audit log: the token's name, else its role."""
        return self.authenticate(bearer(context.invocation_metadata()), peer_certificate(context))

    def authorize(self, method: str, token: str, certificate: bytes | None = None) -> Caller | None:
        if method.startswith(PUBLIC_PREFIXES) or method in OPEN_METHODS:
            return None
        allowed = METHOD_ROLES.get(method)
        caller = self.authenticate(token, certificate)
        if allowed is None or caller.role not in allowed:
            raise PermissionDenied(f"{caller.role} may not call {method.rsplit('/', 1)[-1]}")
        return caller


def require_device_self(context: grpc.ServicerContext, device_id: str) -> None:
    caller = caller_of(context)
    if caller.role == DEVICE and caller.name != device_id:
        # Same answer whether or not the other device exists.
        raise PermissionDenied("a device may only read its own desired state", field="device_id")


AuthorizeFn = Callable[[str, str], Caller | None]
