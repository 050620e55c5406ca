"""The webhook outbox on SQLite and PostgreSQL: written with the change or not at all,
per-rollout order held through retries, dead deliveries out of the way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ota.domain import webhooks as rules
from ota.store import webhooks
from ota.store.session import Store

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _event(store: Store, event_type: str, rollout_id: str, *, fail: bool = False) -> None:
    with store.transaction() as session:
        webhooks.enqueue(
            session,
            event_type,
            data={"rollout_id": rollout_id},
            ordering_key=rules.ordering_key(rollout_id=rollout_id),
            now=NOW,
            feature="wipers",
            rollout_id=rollout_id,
        )
        if fail:
            raise RuntimeError("the change itself failed")


def test_events_commit_with_their_change_and_keep_their_order_through_retries(
    store: Store,
) -> None:
    _event(store, rules.ROLLOUT_CREATED, "r-1")  # nobody subscribed yet: nothing is kept
    with store.transaction() as session:
        assert webhooks.due(session, NOW) == []
        hook = webhooks.create(
            session,
            url="https://a.example/h",
            event_types=(),
            feature="",
            rollout_id="",
            description="",
            creator="admin",
            now=NOW,
        )
        webhooks.create(
            session,
            url="https://b.example/h",
            event_types=(rules.ROLLOUT_KILLED,),
            feature="",
            rollout_id="",
            description="",
            creator="admin",
            now=NOW,
        )
    with pytest.raises(RuntimeError):
        _event(store, rules.ROLLOUT_STARTED, "r-1", fail=True)  # rolled back with the change
    for event_type in (rules.ROLLOUT_STARTED, rules.ROLLOUT_PAUSED):
        _event(store, event_type, "r-1")
    _event(store, rules.ROLLOUT_STARTED, "r-2")

    def heads(at: datetime) -> list[str]:
        with store.transaction() as session:
            return sorted(f"{d.url} {d.body}" for d in webhooks.due(session, at))

    assert heads(NOW) == [
        f'https://a.example/h {{"data":{{"rollout_id":"r-{n}"}},"timestamp":"2026-06-01T12:00:00Z",'
        f'"type":"rollout.started"}}'
        for n in (1, 2)
    ]
    with store.transaction() as session:
        first = next(d for d in webhooks.due(session, NOW) if "r-1" in d.body)
        webhooks.record_attempt(
            session,
            first.delivery_id,
            ok=False,
            status=503,
            error="HTTP 503",
            now=NOW,
            retry_at=NOW + timedelta(seconds=30),
        )
    # r-1 waits for its retry as a whole: its pause never overtakes its start.
    assert all("r-2" in h for h in heads(NOW + timedelta(seconds=1)))
    with store.transaction() as session:
        again = next(
            d for d in webhooks.due(session, NOW + timedelta(seconds=31)) if "r-1" in d.body
        )
        assert (again.delivery_id, again.attempts) == (first.delivery_id, 1)
        webhooks.record_attempt(
            session, again.delivery_id, ok=False, status=0, error="timeout", now=NOW, retry_at=None
        )
    # Dead: parked, and the next event of r-1 goes.
    assert any("rollout.paused" in h for h in heads(NOW + timedelta(seconds=31)))
    with store.transaction() as session:
        dead = webhooks.list_deliveries(
            session, hook.webhook_id, states=["dead"], before=0, limit=10
        )
        assert [(v.event_type, v.row.attempts) for v in dead] == [("rollout.started", 2)]
        assert (
            webhooks.redeliver(session, hook.webhook_id, event_id="", dead_only=True, now=NOW) == 1
        )
        assert webhooks.pending_count(session) == 3  # b wants only kills


def test_a_long_queue_of_one_endpoint_never_hides_another(store: Store) -> None:
    with store.transaction() as session:
        slow, other = (
            webhooks.create(
                session,
                url=f"https://{name}.example/h",
                event_types=(),
                feature="",
                rollout_id=rollout_id,
                description="",
                creator="admin",
                now=NOW,
            )
            for name, rollout_id in (("slow", "r-busy"), ("other", "r-quiet"))
        )
    for _ in range(30):
        _event(store, rules.ROLLOUT_STAGE_ADVANCED, "r-busy")
    _event(store, rules.ROLLOUT_STARTED, "r-quiet")
    with store.transaction() as session:
        head = webhooks.due(session, NOW, scan=1)
        assert [d.url for d in head] == [slow.url]  # the oldest head first
        webhooks.record_attempt(
            session,
            head[0].delivery_id,
            ok=False,
            status=503,
            error="HTTP 503",
            now=NOW,
            retry_at=NOW + timedelta(hours=1),
        )
    with store.transaction() as session:
        # 30 rows wait behind the retrying head; the other endpoint's event goes now.
        assert [d.url for d in webhooks.due(session, NOW, scan=1)] == [other.url]
