"""Telling the caches in front of the origin that an answer they keep is no longer true.

Caches keep the 404 of the next root (``N+1.root.json``, how a device learns of a
rotation) for `origin_next_root_max_age` seconds, far longer than the timestamp,
so that a fleet asking for it costs the origin one request per lifetime. A root
rotation makes that 404 false: the control plane that stored the new root sends
``PURGE /metadata/N+1.root.json`` and ``PURGE /metadata/timestamp.json`` to every
listed cache (the shipped VCL accepts PURGE from its `purgers` addresses; Fastly
accepts it too; CDNs with a purge API need that API called instead, see
docs/OPERATIONS.md).

The purge is sent at once and again `settle` seconds later: a cache whose request
for the root reached the origin just before the rotation may store that 404 after
the first purge (Varnish's first-byte timeout, 30 s in the shipped VCL, bounds how
late). A cache that cannot be reached is retried with backoff and then named in
a warning; devices behind it still learn of the rotation when the 404 expires.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

import urllib3

from ota.errors import InvalidArgument

log = logging.getLogger(__name__)

# Seconds between a purge and its repeat: the shipped VCL's first_byte_timeout.
SETTLE_SECONDS = 30.0
ATTEMPTS = 4


def parse_cache_urls(text: str, *, field: str) -> tuple[str, ...]:
    """Base URLs of caches (``http://cache-1:6081``), separated by commas or spaces."""
    urls: list[str] = []
    for item in text.replace(",", " ").split():
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(
                f"give a cache's base URL like http://cache:6081, got {item!r}", field=field
            )
        if parts.query or parts.fragment or parts.path not in ("", "/"):
            raise InvalidArgument(
                f"a cache's base URL has no path or query, got {item!r}", field=field
            )
        urls.append(f"{parts.scheme}://{parts.netloc}")
    return tuple(urls)


def root_rotation_paths(root_version: int) -> tuple[str, str]:
    """What a rotation to `root_version` makes false in a cache: that root's 404, the timestamp."""
    return (f"/metadata/{root_version}.root.json", "/metadata/timestamp.json")


class CachePurger:
    """Sends PURGE for URLs whose cached answers changed, on threads of its own."""

    def __init__(
        self,
        cache_urls: Sequence[str],
        *,
        settle: float = SETTLE_SECONDS,
        attempts: int = ATTEMPTS,
        retry_base: float = 1.0,
    ) -> None:
        self._urls = tuple(cache_urls)
        self._settle = settle
        self._attempts = attempts
        self._retry_base = retry_base
        self._pool = urllib3.PoolManager()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def root_rotated(self, root_version: int) -> None:
        """Purge what the rotation to `root_version` made false, now and once more later."""
        self.purge(root_rotation_paths(root_version), again_after=self._settle)

    def purge(self, paths: Sequence[str], *, again_after: float | None = None) -> None:
        if not self._urls:
            return
        thread = threading.Thread(
            target=self._run, args=(tuple(paths), again_after), name="ota-purge", daemon=True
        )
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop waiting to repeat purges (a purge under way finishes its request)."""
        self._stop.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=15)

    def _run(self, paths: tuple[str, ...], again_after: float | None) -> None:
        self._purge_all(paths)
        if again_after is not None and not self._stop.wait(again_after):
            self._purge_all(paths)

    def _purge_all(self, paths: tuple[str, ...]) -> None:
        for url in self._urls:
            for path in paths:
                self._purge_one(url + path)

    def _purge_one(self, url: str) -> None:
        problem = ""
        for attempt in range(self._attempts):
            if attempt and self._stop.wait(self._retry_base * 2 ** (attempt - 1)):
                return
            try:
                response = self._pool.request(
                    "PURGE", url, retries=False, redirect=False, timeout=10.0
                )
            except urllib3.exceptions.HTTPError as exc:
                problem = str(exc)
                continue
            # 404: nothing was cached there, which is what a purge wants.
            if response.status in (200, 204, 404):
                log.info("purged %s from the cache", url)
                return
            problem = f"HTTP {response.status}"
            if response.status < 500:
                break  # refused (not an allowed address, no PURGE): asking again will not help
        log.warning(
            "could not purge %s (%s): devices behind that cache learn of the change "
            "when its cached answer expires",
            url,
            problem,
        )
