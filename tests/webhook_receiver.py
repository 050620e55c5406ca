"""A real HTTP endpoint for webhook tests: records every request, misbehaves on cue.

Each request takes the next scripted behaviour (then `ok` forever): `fail`
answers 503, `slow` answers 200 after `slow_seconds`, `hang` holds the
request until `release()` (or `hang_seconds`) and then answers 200, `close`
drops the connection without answering.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: str  # the behaviour it got

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class Receiver:
    def __init__(
        self,
        port: int = 0,
        *,
        slow_seconds: float = 1.0,
        hang_seconds: float = 120.0,
        tls: ssl.SSLContext | None = None,
    ):
        self.slow_seconds = slow_seconds
        self.hang_seconds = hang_seconds
        self.requests: list[Received] = []
        self._script: list[str] = []
        self._lock = threading.Lock()
        self._released = threading.Event()
        self.arrived = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                with receiver._lock:
                    behaviour = receiver._script.pop(0) if receiver._script else "ok"
                    receiver.requests.append(
                        Received({k.lower(): v for k, v in self.headers.items()}, body, behaviour)
                    )
                    receiver.arrived.notify_all()
                if behaviour == "close":
                    self.close_connection = True
                    self.connection.close()
                    return
                if behaviour == "slow":
                    threading.Event().wait(receiver.slow_seconds)
                if behaviour == "hang":
                    receiver._released.wait(receiver.hang_seconds)
                status = 503 if behaviour == "fail" else 200
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hooks/ota"

    def script(self, *behaviours: str) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def release(self) -> None:
        self._released.set()

    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiving(port: int = 0, **options: Any) -> Iterator[Receiver]:
    receiver = Receiver(port, **options)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


def verify_all(requests: list[Received], secret: str) -> None:
    """Every request carries a valid Standard Webhooks signature (raises otherwise)."""
    hook = Webhook(secret)
    for r in requests:
        hook.verify(r.body, r.headers)


def first_arrivals(requests: list[Received]) -> list[Received]:
    """Each event once, in the order it first arrived."""
    seen: set[str] = set()
    out = []
    for r in requests:
        if r.event_id not in seen:
            seen.add(r.event_id)
            out.append(r)
    return out
