"""The delivery origin on a real port, the HTTP source against it, and `ota repo export`.

A dev stack (real broker, real control plane) serves its origin on a free port;
requests are plain urllib3 as any cache or CDN would make them.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3
from tuf.api.exceptions import DownloadError, DownloadHTTPError

from ota.cli.main import main
from ota.client import Client
from ota.delivery.origin import IMMUTABLE
from ota.device.http_source import HttpSource, TransientHttpError
from ota.device.retry import Fault, Unreachable, classify
from ota.device.source import Deadlines
from ota.devstack import DevStack
from ota.v1 import bundle_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import publish

TOKEN = "fleet-delivery-token"


@pytest.fixture
def stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"origin_listen": "127.0.0.1:0", "origin_timestamp_max_age": 3},
    )
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def published(stack: DevStack, tmp_path: Path) -> tuple[str, bytes]:
    """(URL path of the published bundle, its bytes)."""
    client = Client.connect(stack.server, stack.admin_token)
    try:
        sha = publish(client, stack, tmp_path, "1.0.0", size=100_000)
        bundle = client.bundles.ListBundles(
            bundle_pb2.ListBundlesRequest(),
            metadata=client.metadata,
        ).bundles[0]
    finally:
        client.close()
    data = (tmp_path / "bundle-1.0.0.bin").read_bytes()
    parent, _, name = bundle.target_path.rpartition("/")
    return f"/targets/{parent}/{sha}.{name}", data


def get(stack: DevStack, path: str, **headers: str) -> urllib3.BaseHTTPResponse:
    return urllib3.request(
        "GET", stack.control_plane.origin_url + path, headers=headers, retries=False, timeout=10
    )


def test_versioned_metadata_is_immutable_and_the_timestamp_short_lived(stack: DevStack) -> None:
    root = get(stack, "/metadata/1.root.json")
    assert root.status == 200
    assert root.headers["Cache-Control"] == IMMUTABLE
    assert root.data == stack.keys.root_json.read_bytes()
    assert root.headers["ETag"] == f'"{hashlib.sha256(root.data).hexdigest()}"'
    timestamp = get(stack, "/metadata/timestamp.json")
    assert timestamp.headers["Cache-Control"] == "public, max-age=3"
    assert json.loads(timestamp.data)["signed"]["_type"] == "timestamp"
    # A revalidation costs no body.
    again = get(stack, "/metadata/timestamp.json", **{"If-None-Match": timestamp.headers["ETag"]})
    assert again.status == 304 and again.data == b""
    # No such version, no such role, no such file.
    for path in (
        "/metadata/2.root.json",
        "/metadata/1.rooty.json",
        "/metadata/99999999999.root.json",
        "/x",
    ):
        assert get(stack, path).status == 404, path
    # With no cache to purge on a rotation, the next root's 404 lives as the timestamp does.
    assert get(stack, "/metadata/2.root.json").headers["Cache-Control"] == "public, max-age=3"


def test_a_bundle_is_served_whole_in_ranges_and_only_by_its_digest(
    stack: DevStack, published: tuple[str, bytes]
) -> None:
    path, data = published
    whole = get(stack, path)
    assert whole.status == 200 and whole.data == data
    assert whole.headers["Cache-Control"] == IMMUTABLE
    assert whole.headers["Accept-Ranges"] == "bytes"
    etag = whole.headers["ETag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
    part = get(stack, path, Range="bytes=1000-")
    assert part.status == 206 and part.data == data[1000:]
    assert part.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert get(stack, path, Range=f"bytes={len(data)}-").status == 416
    assert get(stack, path, **{"If-None-Match": etag}).status == 304
    # Another digest under the same name is not this bundle.
    wrong = path.replace(path.split("/")[-1][:64], "0" * 64)
    assert get(stack, wrong).status == 404
    assert get(stack, path.replace("targets", "targets/x")).status == 404
    counts = stack.control_plane.origin.metrics  # type: ignore[union-attr]
    assert counts.count("bundle", 206) == 1 and counts.count("bundle", 416) == 1


def test_the_http_source_tells_not_found_from_worth_a_retry(
    stack: DevStack, published: tuple[str, bytes]
) -> None:
    path, data = published
    source = HttpSource(stack.control_plane.origin_url, deadlines=Deadlines())
    assert source.fetch_metadata("root", 1) == stack.keys.root_json.read_bytes()
    assert source.fetch_metadata("root", 2) is None  # no newer root: not an error
    target = path.removeprefix("/targets/")
    assert b"".join(source.fetch_target(target, 0, len(data))) == data
    assert b"".join(source.fetch_target(target, 99_000, len(data) - 99_000)) == data[99_000:]
    with pytest.raises(DownloadHTTPError) as missing:
        list(source.fetch_target(target.replace(target[-20:], "0" * 20), 0, 10))
    assert missing.value.status_code == 404
    # A dead origin, or a cache whose origin is down, is waited out like a restart
    # (unreachable); a failing one is retried as a broken transfer; neither fails.
    dead = HttpSource("http://127.0.0.1:9", deadlines=Deadlines(metadata=2))
    with pytest.raises(Unreachable) as refused:
        dead.fetch_metadata("timestamp", None)
    assert classify(refused.value) is Fault.UNREACHABLE
    assert not isinstance(refused.value, DownloadError)
    for status in (502, 503, 504):
        with failing_server(status) as url, pytest.raises(Unreachable):
            HttpSource(url, deadlines=Deadlines()).fetch_metadata("timestamp", None)
    with failing_server(500) as url, pytest.raises(TransientHttpError) as broken:
        HttpSource(url, deadlines=Deadlines()).fetch_metadata("timestamp", None)
    assert classify(broken.value) is Fault.BROKEN
    with failing_server(403) as url, pytest.raises(DownloadHTTPError):
        list(HttpSource(url, deadlines=Deadlines()).fetch_target("a/" + "0" * 64 + ".b", 0, 5))


class _Failing(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class failing_server:  # noqa: N801 (used as a context manager)
    def __init__(self, status: int) -> None:
        handler = type("Handler", (_Failing,), {"status": status})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_a_token_keeps_strangers_out(tmp_path: Path, broker: BrokerHandle) -> None:
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"origin_listen": "127.0.0.1:0", "origin_token": TOKEN},
    )
    try:
        assert get(dev, "/metadata/1.root.json").status == 401
        assert get(dev, "/metadata/1.root.json", Authorization="Bearer wrong").status == 401
        ok = get(dev, "/metadata/1.root.json", Authorization=f"Bearer {TOKEN}")
        assert ok.status == 200
        source = HttpSource(dev.control_plane.origin_url, deadlines=Deadlines(), token=TOKEN)
        assert source.fetch_metadata("root", 1) == ok.data
    finally:
        dev.stop()


def test_export_writes_what_the_origin_serves(
    database_url: str, broker: BrokerHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The export reads the store itself: on each kind of database.
    stack = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        database_url=database_url,
        config_overrides={"origin_listen": "127.0.0.1:0"},
    )
    try:
        client = Client.connect(stack.server, stack.admin_token)
        try:
            sha = publish(client, stack, tmp_path, "1.0.0", size=50_000)
            target = (
                client.bundles.ListBundles(
                    bundle_pb2.ListBundlesRequest(), metadata=client.metadata
                )
                .bundles[0]
                .target_path
            )
        finally:
            client.close()
        data = (tmp_path / "bundle-1.0.0.bin").read_bytes()
        parent, _, name = target.rpartition("/")
        out = tmp_path / "mirror"
        config = tmp_path / "ota.toml"
        config.write_text(
            f'database_url = "{database_url}"\ndata_dir = "{stack.state_dir / "data"}"\n'
        )
        assert main(["repo", "export", str(out), "--config", str(config)]) == 0
        assert (out / "targets" / parent / f"{sha}.{name}").read_bytes() == data
        for file in ("1.root.json", "timestamp.json", "2.snapshot.json", "2.targets.json"):
            assert (out / "metadata" / file).read_bytes() == get(stack, f"/metadata/{file}").data
        # Again: nothing new, everything kept.
        assert main(["repo", "export", str(out), "--config", str(config)]) == 0
        assert "0 bundle file(s) written" in capsys.readouterr().out
        # A user's mistake is one line and a non-zero exit.
        missing = f"sqlite:///{tmp_path}/none.db"
        assert main(["repo", "export", str(out), "--database-url", missing]) == 1
        assert "no database at" in capsys.readouterr().err
    finally:
        stack.stop()
