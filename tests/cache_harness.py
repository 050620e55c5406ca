"""A real, private Varnish in front of the delivery origin, and a link that can misbehave.

`private_nginx(work_dir, settings)` runs Debian's ``nginx`` the same way with
the configuration `ota.delivery.nginx` renders (devices' mutual TLS ended at
the cache). `private_varnish(work_dir, host, port)` runs Debian's ``varnishd`` in the
foreground on a free loopback port with the VCL `ota.delivery.varnish`
renders, as tests run their own Mosquitto: nobody else's cache, gone when the
test ends. `OriginLink` sits between the cache and the origin and forwards
every request unchanged, unless told to flip a byte of bundle bodies (a
tampered cache entry) or to cut the next bundle body after some bytes, once the
device holds the part that went through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import urllib3

from ota.broker.process import free_port, port_accepts
from ota.delivery.nginx import DeviceCacheSettings, render_nginx
from ota.delivery.varnish import VarnishProcess

FORWARDED = ("Range", "If-None-Match", "Authorization", "If-Range")
PART_PASSED_ON_WAIT = 60.0


@dataclass
class VarnishHandle:
    varnish: VarnishProcess

    @property
    def url(self) -> str:
        return self.varnish.url

    def purge(self, path: str) -> int:
        """Drop the cached object at `path`; the HTTP status of the PURGE."""
        response = urllib3.request("PURGE", self.url + path, retries=False, timeout=10)
        return response.status


@contextlib.contextmanager
def private_varnish(
    work_dir: Path, origin_host: str, origin_port: int, *, token: str = "", port: int | None = None
) -> Iterator[VarnishHandle]:
    varnish = VarnishProcess.start(work_dir, origin_host, origin_port, token=token, port=port)
    try:
        yield VarnishHandle(varnish)
    finally:
        varnish.stop()


class OriginLink:
    """An HTTP hop between the cache and the origin that can tamper with or cut bundles.

    `tamper`: flip one byte in the middle of every bundle body. `cut_next`: send
    only that many bytes of the next bundle body (with the full Content-Length),
    wait until the test sets `part_passed_on` (the device has received bytes of
    it through the cache), and drop the connection. `requests` lists the (path,
    Range) it forwarded.
    """

    def __init__(self, origin_url: str) -> None:
        self.origin_url = origin_url.rstrip("/")
        self.tamper = False
        self.cut_next: int | None = None
        self.part_passed_on = threading.Event()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._pool = urllib3.PoolManager()
        link = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                link._forward(self)

            def do_HEAD(self) -> None:
                link._forward(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        headers = {h: v for h in FORWARDED if (v := handler.headers.get(h)) is not None}
        with self._lock:
            self.requests.append((handler.path, headers.get("Range", "")))
        upstream = self._pool.request(
            handler.command,
            self.origin_url + handler.path,
            headers=headers,
            retries=False,
            redirect=False,
            timeout=30,
        )
        body = upstream.data
        bundle = handler.path.startswith("/targets/") and handler.command == "GET"
        cut: int | None = None
        with self._lock:
            if bundle and self.tamper and body:
                middle = len(body) // 2
                body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
            if bundle and self.cut_next is not None and upstream.status == 200:
                cut, self.cut_next = self.cut_next, None
        handler.send_response(upstream.status)
        for name, value in upstream.headers.items():
            if name.lower() not in (
                "connection",
                "transfer-encoding",
                "content-length",
                "date",
                "server",
            ):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        if cut is not None:
            handler.send_header("Connection", "close")
        handler.end_headers()
        if handler.command == "HEAD":
            return
        handler.wfile.write(body if cut is None else body[:cut])
        handler.wfile.flush()
        if cut is not None:
            # A link that dies mid-transfer: the first part goes through the cache to
            # the device before the connection breaks, not together with the break
            # (the cache would then answer an error without passing the part on).
            # Bounded: if the part never arrives, the cut happens anyway and the
            # test's resume assertions say so.
            self.part_passed_on.wait(timeout=PART_PASSED_ON_WAIT)
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class NginxHandle:
    """A private nginx (Debian's, in the foreground) running `ota.delivery.nginx`'s config."""

    process: subprocess.Popen[bytes]
    port: int
    work_dir: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def reload(self) -> None:
        """SIGHUP, as `systemctl reload nginx`: re-reads the CRL; returns at once."""
        self.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        path = self.work_dir / "error.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def private_nginx(
    work_dir: Path, settings: Callable[[str, Path], DeviceCacheSettings]
) -> Iterator[NginxHandle]:
    """nginx on a free loopback port; `settings(listen, cache_dir)` gives the rest."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        raise AssertionError("nginx is not installed: apt-get install nginx-light (.ci/run does)")
    work_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rendered = render_nginx(settings(f"127.0.0.1:{port}", work_dir / "cache"))
    temp = "\n".join(
        f"    {kind}_temp_path {work_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = work_dir / "nginx.conf"
    # Started by root (CI), nginx's workers would become nobody, who cannot enter the
    # test's directory; they stay the test's user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""daemon off;
{user}worker_processes 1;
pid {work_dir / "nginx.pid"};
error_log {work_dir / "error.log"} info;
events {{ worker_connections 512; }}
http {{
    access_log off;
{temp}
{rendered}
}}
"""
    )
    process = subprocess.Popen(
        [binary, "-e", str(work_dir / "error.log"), "-p", str(work_dir), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    handle = NginxHandle(process, port, work_dir)
    try:
        deadline = time.monotonic() + 60
        while not port_accepts("127.0.0.1", port):
            if process.poll() is not None:
                raise AssertionError(f"nginx exited: {handle.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("nginx did not accept connections within 60 s")
            time.sleep(0.05)
        yield handle
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: workers finish and go
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
