"""TUF metadata and bundle bytes over HTTP(S), from the origin or any cache or CDN in front of it.

A `MetadataSource` for `DeviceTrust`, like the gRPC one, with the same
contract: a refusal a retry cannot change (404 on a bundle, 401, 403, 416 ...)
is raised as ``DownloadHTTPError`` and ends the transfer; an origin or cache that
cannot be reached (connection refused or reset, a connect timeout, 502, 503,
504) is `Unreachable`, waited out like a control-plane restart; anything else
(other 5xx, 429, a stall) is an ordinary exception the device retries
and, for a bundle, resumes from the last byte with a ``Range`` request. A
missing metadata version is None, as ngclient expects of "no newer root".

Bundles are asked for by their content address (``<dir>/<sha256>.<name>``,
`content_addressed`): the URL names the bytes, so a cache may keep them for a
year, and a cache holding other bytes under it cannot make a device accept them
(python-tuf checks length and hashes against the signed targets).

Deadlines are per transfer, as over gRPC: a metadata request must finish within
`metadata` seconds, a bundle request within `download(remaining)`; the socket's
read timeout bounds a stall, and the total is checked after every chunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol
from urllib.parse import quote

import urllib3
from tuf.api.exceptions import DownloadHTTPError, DownloadLengthMismatchError
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError

from ota.device.retry import Unreachable

CHUNK = 64 * 1024
# More than any metadata file this repository signs; ngclient caps each role lower still.
MAX_METADATA_BYTES = 16 * 1024 * 1024
# Answers a retry cannot change. 404 on metadata is "no such version" (None).
_PERMANENT = frozenset({400, 401, 403, 404, 405, 410, 412, 416, 501})
# A gateway or cache whose origin is down (being restarted): waited out, not counted.
_UNREACHABLE = frozenset({502, 503, 504})


class TransferDeadlines(Protocol):
    """Per-transfer deadlines in seconds (ota.device.source.Deadlines is one)."""

    @property
    def metadata(self) -> float: ...

    def download(self, remaining: int) -> float: ...


class TransientHttpError(Exception):
    """An answer worth retrying (5xx, 429, 408, a deadline passed)."""


class HttpSource:
    """One device's view of the delivery origin (or a cache in front of it).

    `pool` is shared by many devices as a gRPC channel is; `token` is the
    fleet's delivery token, sent as a bearer token when set.
    """

    content_addressed = True

    def __init__(
        self,
        base_url: str,
        *,
        deadlines: TransferDeadlines,
        pool: urllib3.PoolManager | None = None,
        token: str = "",
    ) -> None:
        self._base = base_url.rstrip("/")
        self._deadlines = deadlines
        self._pool = pool or urllib3.PoolManager()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        name = f"{version}.{role}.json" if version else f"{role}.json"
        limit = self._deadlines.metadata
        response = self._get(f"{self._base}/metadata/{name}", self._headers, limit)
        try:
            if response.status == 404:
                return None
            _check(response, name)
            body = bytearray()
            for chunk in _chunks(response, time.monotonic() + limit, name):
                body += chunk
                if len(body) > MAX_METADATA_BYTES:
                    raise DownloadLengthMismatchError(
                        f"{name} is longer than {MAX_METADATA_BYTES} bytes"
                    )
            return bytes(body)
        finally:
            _release(response)

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        limit = self._deadlines.download(max_length)
        deadline = time.monotonic() + limit
        headers = dict(self._headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = f"{self._base}/targets/{quote(target_path)}"
        response = self._get(url, headers, limit)
        try:
            _check(response, target_path)
            skip = offset if response.status == 200 else 0  # a server that ignored Range
            if response.status == 206:
                _check_range(response, offset, target_path)
            for chunk in _chunks(response, deadline, target_path):
                dropped = min(skip, len(chunk))
                skip -= dropped
                if dropped < len(chunk):
                    yield chunk[dropped:]
        finally:
            _release(response)

    def _get(self, url: str, headers: dict[str, str], seconds: float) -> urllib3.BaseHTTPResponse:
        try:
            return self._pool.request(
                "GET",
                url,
                headers=headers,
                timeout=urllib3.Timeout(connect=seconds, read=seconds),
                retries=False,  # the device's RetryPolicy decides, with its backoff
                preload_content=False,
                redirect=False,
            )
        except (NewConnectionError, ConnectTimeoutError, ProtocolError) as exc:
            # Nobody answered (refused, reset, no connection in time): an origin or
            # cache being restarted, not a fault of this transfer.
            raise Unreachable(f"{url}: {exc}") from exc


def _check(response: urllib3.BaseHTTPResponse, what: str) -> None:
    status = response.status
    if status in (200, 206):
        return
    if status in _PERMANENT:
        raise DownloadHTTPError(f"{what}: HTTP {status}", status)
    if status in _UNREACHABLE:
        raise Unreachable(f"{what}: HTTP {status}")
    raise TransientHttpError(f"{what}: HTTP {status}")


def _check_range(response: urllib3.BaseHTTPResponse, offset: int, what: str) -> None:
    # "bytes START-END/LENGTH": the part must start where the device stopped.
    content_range = response.headers.get("Content-Range", "")
    unit, _, spec = content_range.partition(" ")
    start = spec.partition("-")[0]
    if unit != "bytes" or not start.isdigit() or int(start) != offset:
        raise TransientHttpError(f"{what}: asked for bytes from {offset}, got {content_range!r}")


def _chunks(response: urllib3.BaseHTTPResponse, deadline: float, what: str) -> Iterator[bytes]:
    for chunk in response.stream(CHUNK, decode_content=False):
        yield chunk
        if time.monotonic() > deadline:
            raise TransientHttpError(f"{what}: transfer deadline passed")


def _release(response: urllib3.BaseHTTPResponse) -> None:
    # A response read to its end goes back to the pool; one stopped early (a deadline,
    # excess bytes, a refusal) is closed, so no half-read connection is reused.
    if not response.closed:
        response.close()
    response.release_conn()
