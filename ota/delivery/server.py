"""An ASGI app on a listener of its own: uvicorn on a thread of the control plane process.

uvicorn runs its own asyncio loop on that thread, beside the gRPC server. The
socket is bound in the constructor, so a port in use fails `ota serve` before
any other thread starts, and port 0 picks a free one.

With `client_ca_file` the listener demands a client certificate of that CA
and hands it to the app in every request's scope, as the ASGI TLS extension
says (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first).
uvicorn does not fill that extension in itself, so `_PeerCertificateProtocol`
does: asyncio calls a protocol's ``connection_made`` only once the TLS
handshake is over, so the peer certificate is known there, read once per
connection from the transport's ``ssl_object``, and added to the scope of each
request that connection carries (keep-alive included). Whether the
certificate still counts is the app's decision, per request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

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
        client_ca_file: str = "",
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
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca_file else ssl.CERT_NONE,
            ssl_ca_certs=client_ca_file or None,
            http=_PeerCertificateProtocol if client_ca_file else "auto",
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


class _PeerCertificateProtocol(H11Protocol):
    """uvicorn's h11 protocol, adding the client's certificate to each request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        # Per connection: `self.app` is what this connection's requests are served by.
        self.app = _WithPeerCertificate(self.app, chain)


class _WithPeerCertificate:
    def __init__(self, app: ASGIApp, chain: list[str]) -> None:
        self._app = app
        self._chain = chain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        extensions = dict(scope.get("extensions") or {})
        extensions["tls"] = {"client_cert_chain": list(self._chain)}
        await self._app({**scope, "extensions": extensions}, receive, send)
