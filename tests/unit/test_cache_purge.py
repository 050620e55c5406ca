"""Purging caches after a root rotation: the URLs, the repeat, the retries, the give-up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ota.delivery.purge import CachePurger, parse_cache_urls
from ota.errors import InvalidArgument


class FakeCache:
    """Answers PURGE with the statuses it is given (then 200), and notes every path."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.paths: list[str] = []
        self.changed = threading.Condition()
        cache = self

        class Handler(BaseHTTPRequestHandler):
            def do_PURGE(self) -> None:
                with cache.changed:
                    status = cache.statuses.pop(0) if cache.statuses else 200
                    cache.paths.append(self.path)
                    cache.changed.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int) -> list[str]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.paths) >= count, timeout=30), self.paths
            return list(self.paths)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cache() -> Iterator[FakeCache]:
    fake = FakeCache([])
    try:
        yield fake
    finally:
        fake.close()


def test_cache_urls_are_base_urls_separated_by_commas_or_spaces() -> None:
    assert parse_cache_urls("", field="f") == ()
    assert parse_cache_urls("http://a:6081, https://b/ http://c", field="f") == (
        "http://a:6081",
        "https://b",
        "http://c",
    )
    for bad in ("a:6081", "ftp://a", "http://a/purge", "http://a?x=1", "http://"):
        with pytest.raises(InvalidArgument) as caught:
            parse_cache_urls(bad, field="origin_purge_urls")
        assert caught.value.field == "origin_purge_urls"


def test_a_rotation_purges_the_new_roots_404_and_the_timestamp_now_and_again(
    cache: FakeCache,
) -> None:
    purger = CachePurger([cache.url], settle=0.2)
    try:
        purger.root_rotated(3)
        wanted = ["/metadata/3.root.json", "/metadata/timestamp.json"]
        assert cache.wait_for(4) == wanted + wanted
    finally:
        purger.stop()


def test_a_cache_in_trouble_is_asked_again_and_a_refusal_is_named(
    cache: FakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache.statuses = [503, 503, 405]
    purger = CachePurger([cache.url], settle=3600, retry_base=0.01)
    try:
        with caplog.at_level(logging.WARNING, logger="ota.delivery.purge"):
            purger.root_rotated(2)
            # 503 twice, then 405 (not an allowed address): given up; the timestamp's goes through.
            assert cache.wait_for(4) == [
                "/metadata/2.root.json",
                "/metadata/2.root.json",
                "/metadata/2.root.json",
                "/metadata/timestamp.json",
            ]
    finally:
        purger.stop()
    assert any(
        "could not purge" in r.getMessage() and "2.root.json (HTTP 405)" in r.getMessage()
        for r in caplog.records
    ), caplog.text


def test_without_caches_nothing_is_sent() -> None:
    purger = CachePurger([])
    purger.root_rotated(2)
    purger.stop()
