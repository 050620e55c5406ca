"""Sending webhooks: sign a delivery, POST it, and the worker that drains the outbox.

Signatures follow Standard Webhooks (the `standardwebhooks` package signs):
`webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`.
`webhook-id` is the event's id, the same on every retry, so a receiver can
drop the duplicates at-least-once delivery implies. Redirects are not
followed: an endpoint answers for itself.
"""

from __future__ import annotations

import http.client
import logging
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from standardwebhooks.webhooks import Webhook

from ota.clock import Clock
from ota.domain.webhooks import RetryPolicy
from ota.runtime import Worker
from ota.store import webhooks
from ota.store.session import Store

log = logging.getLogger(__name__)

USER_AGENT = "ota-webhooks/1"


@dataclass(frozen=True)
class Outcome:
    ok: bool
    status: int  # the HTTP status; 0 when there was no answer
    error: str  # empty when ok


def signed_headers(secret: str, event_id: str, when: datetime, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, when, body),
    }


class Sender:
    """One HTTP POST per attempt, with a deadline for the whole exchange."""

    def __init__(self, *, timeout_seconds: float = 10.0, ca_file: str = "") -> None:
        self._timeout = timeout_seconds
        self._tls = ssl.create_default_context(cafile=ca_file or None)

    def send(self, url: str, secret: str, event_id: str, body: str, when: datetime) -> Outcome:
        data = body.encode()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signed_headers(secret, event_id, when, data),
        }
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self._timeout, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(
                parts.hostname or "", parts.port, timeout=self._timeout
            )
        try:
            connection.request("POST", path, body=data, headers=headers)
            response = connection.getresponse()
            response.read(4096)
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(False, 0, f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()
        if 200 <= status < 300:
            return Outcome(True, status, "")
        return Outcome(False, status, f"HTTP {status}")


class WebhookWorker:
    """Drains the delivery outbox while this replica holds the engine lease.

    Each pass sends the due head of every (endpoint, ordering key) queue at
    once, on a small pool, and records each outcome in its own transaction.
    A delivery is recorded only after the endpoint answered: a crash in
    between sends it again (at least once, never lost).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        sender: Sender,
        *,
        retry: RetryPolicy,
        holds_lease: Callable[[], bool] = lambda: True,
        poll_seconds: float = 0.5,
        senders: int = 8,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sender = sender
        self._retry = retry
        self._holds_lease = holds_lease
        self._poll = poll_seconds
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="ota-webhook")
        self._worker = Worker(
            "webhooks",
            self._step,
            interval=poll_seconds,
            active=holds_lease,
            join_seconds=30.0,
        )
        self.on_attempt: Callable[[Outcome, bool], None] = lambda _outcome, _dead: None

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        self._worker.wake()

    def _step(self) -> float | None:
        return 0.0 if self.pass_once() > 0 else None

    def pass_once(self) -> int:
        """Attempt every due queue head once; returns how many were attempted."""
        with self._store.transaction() as session:
            due = webhooks.due(session, self._clock.now())
        futures = [(d, self._pool.submit(self._attempt, d)) for d in due]
        for d, future in futures:
            outcome = future.result()
            self._record(d, outcome)
        return len(due)

    def _attempt(self, d: webhooks.Due) -> Outcome:
        return self._sender.send(d.url, d.secret, d.event_id, d.body, self._clock.now())

    def _record(self, d: webhooks.Due, outcome: Outcome) -> None:
        now = self._clock.now()
        attempts = d.attempts + 1
        retry_at: datetime | None = None
        dead = False
        if not outcome.ok:
            if self._retry.gives_up_after(attempts):
                dead = True
                log.warning(
                    "webhook delivery %d of %s to %s parked as dead after %d attempts: %s",
                    d.delivery_id,
                    d.event_id,
                    d.url,
                    attempts,
                    outcome.error,
                )
            else:
                retry_at = now + timedelta(seconds=self._retry.delay_after(attempts))
                log.info(
                    "webhook delivery %d of %s to %s failed (attempt %d: %s); retrying at %s",
                    d.delivery_id,
                    d.event_id,
                    d.url,
                    attempts,
                    outcome.error,
                    retry_at.isoformat(timespec="seconds"),
                )
        with self._store.transaction() as session:
            webhooks.record_attempt(
                session,
                d.delivery_id,
                ok=outcome.ok,
                status=outcome.status,
                error=outcome.error,
                now=now,
                retry_at=retry_at,
            )
        self.on_attempt(outcome, dead)
