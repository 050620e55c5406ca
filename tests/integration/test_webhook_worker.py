"""The delivery worker over a real store and a real HTTP receiver: only the lease holder
sends, each event once when the receiver is well, in order per rollout."""

from __future__ import annotations

import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from ota.clock import SystemClock
from ota.domain import webhooks as rules
from ota.store import webhooks
from ota.store.session import Store
from ota.store.webhooks import new_secret
from ota.tls import generate_dev_pki
from ota.transport.webhooks import Sender, WebhookWorker
from tests.e2e.scenario import wait_for
from tests.webhook_receiver import receiving, verify_all

pytestmark = pytest.mark.integration


def test_only_the_lease_holder_sends_and_each_event_arrives_once_in_order(store: Store) -> None:
    clock = SystemClock()
    retry = rules.RetryPolicy(base_seconds=0.1, max_seconds=0.5, max_attempts=5)
    with receiving() as receiver:
        with store.transaction() as session:
            hook = webhooks.create(
                session,
                url=receiver.url,
                event_types=(),
                feature="",
                rollout_id="",
                description="",
                creator="admin",
                now=clock.now(),
            )
        sent = {rid: [f"{rid}-{n}" for n in range(8)] for rid in ("r-1", "r-2", "r-3")}
        for n in range(8):
            for rid, names in sent.items():
                with store.transaction() as session:
                    webhooks.enqueue(
                        session,
                        rules.ROLLOUT_STARTED,
                        data={"rollout_id": rid, "n": names[n]},
                        ordering_key=rules.ordering_key(rollout_id=rid),
                        now=clock.now() - timedelta(seconds=1),
                        rollout_id=rid,
                    )
        receiver.script("fail", "fail")  # two queues retry their first event
        holder = WebhookWorker(store, clock, Sender(timeout_seconds=5), retry=retry)
        standby = WebhookWorker(
            store, clock, Sender(timeout_seconds=5), retry=retry, holds_lease=lambda: False
        )
        standby.start()
        holder.start()
        try:
            wait_for(lambda: webhooks_pending(store) == 0, what="the outbox drained", timeout=60)
        finally:
            holder.stop()
            standby.stop()
        requests = receiver.snapshot()
        verify_all(requests, hook.secret)
        ok = [r for r in requests if r.answered == "ok"]
        assert len(ok) == 24 == len({r.event_id for r in ok})  # each once, by one sender
        for rid, names in sent.items():
            got = [r.payload["data"]["n"] for r in ok if r.payload["data"]["rollout_id"] == rid]
            assert got == names


def webhooks_pending(store: Store) -> int:
    with store.transaction() as session:
        return webhooks.pending_count(session)


def test_https_endpoints_are_verified_against_the_configured_ca(tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path / "pki")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    secret = new_secret()
    with receiving(tls=tls) as receiver:
        assert receiver.url.startswith("https://127.0.0.1:")
        trusting = Sender(timeout_seconds=10, ca_file=str(pki.ca_cert))
        outcome = trusting.send(
            receiver.url, secret, "msg_tls", '{"type":"x"}', SystemClock().now()
        )
        assert (outcome.ok, outcome.status) == (True, 200), outcome.error
        verify_all(receiver.snapshot(), secret)
        # The system's CAs do not know this one: refused before anything is sent.
        stranger = Sender(timeout_seconds=10)
        refused = stranger.send(receiver.url, secret, "msg_x", "{}", SystemClock().now())
        assert not refused.ok and "CERTIFICATE_VERIFY_FAILED" in refused.error
        assert len(receiver.snapshot()) == 1
