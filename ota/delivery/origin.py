"""The HTTP origin: TUF metadata and bundles as a dumb mirror any HTTP cache or CDN can front.

TUF makes the transport untrusted: a device believes the signatures, not the
server. So everything here is plain static files with cache headers:

- ``/metadata/N.<role>.json`` and ``/targets/<dir>/<sha256>.<name>`` never
  change once they exist (the repository refuses a second ``(role, version)``;
  a bundle's URL names its own digest), so they are immutable with a one-year
  lifetime and a cache asks the origin for each at most once.
- ``/metadata/timestamp.json`` is what says "something new": a short lifetime
  (`timestamp_max_age`), so a cache re-asks a few times a minute, not once per
  device.
- A 404 for ``N+1.root.json`` (no rotation yet) is kept `next_root_max_age`:
  long where a rotation purges it from the caches, else as long as the timestamp.

Every answer carries a strong ETag (the SHA-256 of the bytes) and honours
If-None-Match (304); bundles honour Range (206, 416 past the end) so a cut
download resumes. Only published bundles are served; a pending one's bytes stay
out of reach. With a `token`, each request must carry
``Authorization: Bearer <token>`` (docs/DECISIONS.md: "Private bundles behind a
shared cache"). With `devices`, each request must come over a connection whose
client certificate is a device's current one, checked on every request, so a
revoked device's next request is refused even on a connection kept alive
(docs/DECISIONS.md: "Mutual TLS on the delivery origin").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ota.errors import OtaError

IMMUTABLE = "public, max-age=31536000, immutable"
_VERSIONED = re.compile(r"^(?P<version>[1-9][0-9]{0,9})\.(?P<role>root|snapshot|targets)\.json$")
_HASHED = re.compile(r"^(?P<sha>[0-9a-f]{64})\.(?P<name>.+)$")
# Versions are stored as 32-bit integers on PostgreSQL: a larger one cannot exist.
_MAX_VERSION = 2**31 - 1


class MetadataReader(Protocol):
    def metadata(self, role: str, version: int | None = None) -> bytes | None:
        """Stored metadata bytes as devices fetch them (None: the latest), or None."""
        ...


class PublishedBundles(Protocol):
    def published(self, target_path: str) -> tuple[str, int] | None:
        """(sha256 hex, length) of the published bundle at `target_path`, or None."""
        ...


@dataclass(frozen=True)
class OriginSettings:
    """What the origin serves and how long caches may keep it."""

    blobs: Path
    timestamp_max_age: int = 5
    token: str = ""
    # How long caches keep the 404 of a root version not stored yet (the next root):
    # long only where a rotation purges it (ota.delivery.purge), else the timestamp's.
    next_root_max_age: int = 5


# Checks a client certificate (PEM) and returns the device it names; raises
# `Unauthenticated` when it is not a device's current certificate.
DeviceCheck = Callable[[bytes], str]


class OriginMetrics:
    """Requests the origin answered, by path class and status: what a cache saves shows here."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "ota_origin_requests",
            "HTTP requests the delivery origin answered, by path class "
            "(metadata: versioned, timestamp: timestamp.json, bundle, other) and status",
            ["kind", "status"],
            registry=registry,
        )
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, int], int] = {}

    def observe(self, kind: str, status: int) -> None:
        self.requests.labels(kind, str(status)).inc()
        with self._lock:
            self._counts[kind, status] = self._counts.get((kind, status), 0) + 1

    def count(self, kind: str, status: int | None = None) -> int:
        """Requests of `kind` so far (with `status` only, if given)."""
        with self._lock:
            return sum(n for (k, s), n in self._counts.items() if k == kind and status in (None, s))


class Origin:
    """The origin's ASGI app (`app`), over the repository's metadata and the blob store."""

    def __init__(
        self,
        metadata: MetadataReader,
        bundles: PublishedBundles,
        settings: OriginSettings,
        metrics: OriginMetrics | None = None,
        *,
        devices: DeviceCheck | None = None,
    ) -> None:
        self._metadata = metadata
        self._devices = devices
        self._bundles = bundles
        self._settings = settings
        self.metrics = metrics or OriginMetrics()
        routes = Starlette(
            routes=[
                Route("/metadata/{name}", self._get_metadata, methods=["GET", "HEAD"]),
                Route("/targets/{path:path}", self._get_target, methods=["GET", "HEAD"]),
                Route("/{path:path}", self._other, methods=["GET", "HEAD"]),
            ]
        )
        self.app: ASGIApp = _Counted(routes, self.metrics)

    # Plain functions: Starlette runs them on its thread pool, off the event loop,
    # since the metadata read may wait on the database.
    def _get_metadata(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        if (refused := self._refuse_device(request)) is not None:
            return self._answer(request, "other", refused)
        if name == "timestamp.json":
            kind, role, version = "timestamp", "timestamp", None
            cache = f"public, max-age={self._settings.timestamp_max_age}"
        else:
            match = _VERSIONED.match(name)
            if match is None or int(match["version"]) > _MAX_VERSION:
                return self._answer(request, "other", _not_found())
            kind, role, version = "metadata", match["role"], int(match["version"])
            cache = IMMUTABLE
        if (refused := self._refuse(request)) is not None:
            return self._answer(request, kind, refused)
        content = self._metadata.metadata(role, version)
        if content is None:
            # Root N+1 is how a device learns of a rotation: every refresh asks for it.
            max_age = (
                self._settings.next_root_max_age
                if role == "root"
                else self._settings.timestamp_max_age
            )
            return self._answer(request, kind, _not_found(max_age))
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        headers = {"Cache-Control": cache, "ETag": etag}
        if _matches(request, etag):
            return self._answer(request, kind, Response(status_code=304, headers=headers))
        return self._answer(
            request, kind, Response(content, media_type="application/json", headers=headers)
        )

    def _get_target(self, request: Request) -> Response:
        path = str(request.path_params["path"])
        if (refused := self._refuse_device(request)) is not None:
            return self._answer(request, "other", refused)
        parent, sep, base = path.rpartition("/")
        hashed = _HASHED.match(base)
        if hashed is None:
            return self._answer(request, "other", _not_found())
        if (refused := self._refuse(request)) is not None:
            return self._answer(request, "bundle", refused)
        published = self._bundles.published(f"{parent}{sep}{hashed['name']}")
        if published is None or published[0] != hashed["sha"]:
            return self._answer(request, "bundle", _not_found(self._settings.timestamp_max_age))
        sha, _length = published
        blob = self._settings.blobs / sha
        if not blob.is_file():
            # Published but its bytes are gone: the operator's problem, not a missing file.
            return self._answer(
                request, "bundle", PlainTextResponse("bundle bytes missing", status_code=503)
            )
        etag = f'"{sha}"'
        headers = {"Cache-Control": IMMUTABLE, "ETag": etag}
        if _matches(request, etag):
            return self._answer(request, "bundle", Response(status_code=304, headers=headers))
        return self._answer(
            request,
            "bundle",
            FileResponse(blob, headers=headers, media_type="application/octet-stream"),
        )

    def _other(self, request: Request) -> Response:
        if (refused := self._refuse_device(request)) is not None:
            return self._answer(request, "other", refused)
        return self._answer(request, "other", _not_found())

    def _refuse(self, request: Request) -> Response | None:
        token = self._settings.token
        if not token:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return PlainTextResponse(
            "a delivery token is required",
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="ota"', "Cache-Control": "no-store"},
        )

    def _refuse_device(self, request: Request) -> Response | None:
        if self._devices is None:
            return None
        chain = _client_cert_chain(request.scope)
        if not chain:
            # The listener demands a certificate, so this is a misconfigured listener.
            return _forbidden("a device certificate is required")
        try:
            self._devices(chain[0].encode())
        except OtaError as exc:
            # Revoked, renewed since, expired by the control plane's clock, not a device's.
            return _forbidden(str(exc))
        return None

    def _answer(self, request: Request, kind: str, response: Response) -> Response:
        request.state.kind = kind  # counted by _Counted with the status actually sent
        return response


class _Counted:
    """Counts each answer by path class and the status sent (FileResponse picks 206/416 late)."""

    def __init__(self, app: ASGIApp, metrics: OriginMetrics) -> None:
        self._app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self._app(scope, receive, observe)
        finally:
            state = scope.get("state") or {}
            self._metrics.observe(str(state.get("kind", "other")), status)


def _matches(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match")
    if wanted is None:
        return False
    tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
    return etag in tags or "*" in tags


def _client_cert_chain(scope: Scope) -> list[str]:
    """The client's certificates (PEM, leaf first) from the ASGI TLS extension, if any."""
    tls: Any = (scope.get("extensions") or {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return [str(c) for c in chain]


def _forbidden(reason: str) -> Response:
    # Never cached: the answer is this device's, and may change with its next certificate.
    return PlainTextResponse(reason, status_code=403, headers={"Cache-Control": "no-store"})


def _not_found(max_age: int = 60) -> Response:
    return PlainTextResponse(
        "not found", status_code=404, headers={"Cache-Control": f"public, max-age={max_age}"}
    )
