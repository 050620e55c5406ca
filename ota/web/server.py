"""The dashboard's listener: uvicorn serving the Starlette app on a thread of its own.

uvicorn runs its own asyncio loop on that thread, inside the control plane
process, beside the gRPC server; the socket is bound before the thread starts,
so a port in use fails `ota serve` at once, and port 0 picks a free one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time

import uvicorn

from ota.errors import InvalidArgument
from ota.metrics import parse_listen
from ota.web.app import Dashboard

log = logging.getLogger(__name__)


class DashboardServer:
    def __init__(
        self,
        dashboard: Dashboard,
        listen: str,
        *,
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        self.dashboard = dashboard
        host, port = parse_listen(listen)
        self.tls = bool(tls_cert_file)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise InvalidArgument(
                f"cannot listen on {listen}: {exc.strerror}", field="dashboard_listen"
            ) from exc
        self._socket.listen(128)
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            dashboard.app,
            log_config=None,
            access_log=False,  # URLs carry no secrets, but a busy page is noise
            lifespan="off",
            ssl_certfile=tls_cert_file or None,
            ssl_keyfile=tls_key_file or None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def _run(self) -> None:
        # uvicorn installs signal handlers only on the main thread; this one has none.
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard did not start within 10 s")
            time.sleep(0.02)
        log.info("dashboard at %s", self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:  # started
            self._thread.join(timeout=10)
        self._socket.close()
