"""An ASGI app on a listener of its own: uvicorn on a thread of the control plane process.

uvicorn runs its own asyncio loop on that thread, beside the gRPC server. The
socket is bound in the constructor, so a port in use fails `ota serve` before
any other thread starts, and port 0 picks a free one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from ota.errors import InvalidArgument
from ota.metrics import parse_listen

log = logging.getLogger(__name__)


class HttpListener:
    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        name: str,
        field: str,
        tls_cert_file: str = "",
        tls_key_file: str = "",
    ) -> None:
        self.name = name
        try:
            host, port = parse_listen(listen)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{listen!r} is not host:port", field=field) from exc
        self.tls = bool(tls_cert_file)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as exc:
            self._socket.close()
            raise InvalidArgument(
                f"cannot listen on {listen}: {exc.strerror}", field=field
            ) from exc
        self._socket.listen(1024)  # a fleet's cache misses arrive together
        self.host = host
        self.port = int(self._socket.getsockname()[1])
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=tls_cert_file or None,
            ssl_keyfile=tls_key_file or None,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
            timeout_graceful_shutdown=2,
            proxy_headers=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _run(self) -> None:
        # uvicorn installs signal handlers only on the main thread; this one has none.
        asyncio.run(self._server.serve(sockets=[self._socket]))

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} did not start within 10 s")
            time.sleep(0.02)
        log.info("%s at %s", self.name, self.url)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.ident is not None:
            self._thread.join(timeout=10)
        self._socket.close()
