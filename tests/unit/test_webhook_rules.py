"""Webhook rules: which audit action is which event, endpoint URLs, retries, signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from datetime import UTC, datetime

import pytest

from ota.domain import webhooks as rules
from ota.errors import InvalidArgument
from ota.store.webhooks import new_secret
from ota.transport.webhooks import signed_headers


def test_a_gate_that_stops_a_rollout_is_a_trip_then_its_outcome() -> None:
    assert rules.rollout_events("pause", {"figures": {"gate": 0}}) == [
        rules.ROLLOUT_GATE_TRIPPED,
        rules.ROLLOUT_PAUSED,
    ]
    assert rules.rollout_events("rollback", {"figures": {}}) == [
        rules.ROLLOUT_GATE_TRIPPED,
        rules.ROLLOUT_ROLLED_BACK,
    ]
    assert rules.rollout_events("pause", {"phase": ["soaking", ""]}) == [rules.ROLLOUT_PAUSED]
    assert rules.rollout_events("gate-observed", None) == [rules.ROLLOUT_GATE_BREACHED]
    assert rules.rollout_events("held", None) == [rules.ROLLOUT_GATE_BREACHED]
    assert rules.rollout_events("expose", {"notified": 3}) == []


def test_subscriptions_filter_by_type_feature_and_rollout() -> None:
    everything = rules.Subscription()
    assert everything.wants(rules.KEYS_ROTATED, feature="", rollout_id="")
    narrow = rules.Subscription((rules.ROLLOUT_PAUSED,), feature="wipers", rollout_id="")
    assert narrow.wants(rules.ROLLOUT_PAUSED, feature="wipers", rollout_id="r-1")
    assert not narrow.wants(rules.ROLLOUT_PAUSED, feature="lights", rollout_id="r-1")
    assert not narrow.wants(rules.ROLLOUT_RESUMED, feature="wipers", rollout_id="r-1")
    one = rules.Subscription(rollout_id="r-1")
    assert not one.wants(rules.BUNDLE_PUBLISHED, feature="wipers", rollout_id="")
    assert rules.check_event_types(["*"]) == ()
    with pytest.raises(InvalidArgument, match=r"rollout\.paused"):
        rules.check_event_types(["rollout.pasued"])


@pytest.mark.parametrize(
    ("url", "allow_http", "ok"),
    [
        ("https://hooks.example.com/ota", False, True),
        ("http://hooks.example.com/ota", True, False),
        ("http://127.0.0.1:8080/x", False, False),
        ("http://127.0.0.1:8080/x", True, True),
        ("http://localhost/x", True, True),
        ("http://[::1]:9/x", True, True),
        ("ftp://example.com/", True, False),
        ("https://user:pw@example.com/", False, False),
        ("https://example.com:notaport/", False, False),
        ("", False, False),
    ],
)
def test_endpoints_are_https_and_http_only_to_loopback_when_allowed(
    url: str, allow_http: bool, ok: bool
) -> None:
    if ok:
        assert rules.check_url(url, allow_http=allow_http) == url
    else:
        with pytest.raises(InvalidArgument) as info:
            rules.check_url(url, allow_http=allow_http)
        assert info.value.field == "webhook.url"


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = rules.RetryPolicy(base_seconds=2, max_seconds=60, max_attempts=5)
    rng = random.Random(7)
    for attempts, ceiling in [(1, 2), (2, 4), (3, 8), (6, 60), (20, 60)]:
        delays = [policy.delay_after(attempts, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # spread, not one instant
    assert not policy.gives_up_after(4) and policy.gives_up_after(5)


def test_signatures_are_hmac_sha256_over_id_timestamp_and_body() -> None:
    secret = new_secret()
    when = datetime(2026, 12, 4, 18, 0, 7, 900_000, tzinfo=UTC)
    body = b'{"type":"rollout.paused"}'
    headers = signed_headers(secret, "msg_1", when, body)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(int(when.timestamp()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"msg_1.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
