"""Webhook endpoints, the events written with each change, and the delivery outbox.

`enqueue` runs inside the transaction of the change it announces (a rollout
transition, a bundle publication): the event and one delivery row per
subscribed endpoint commit with it or not at all. The delivery worker
(`ota.transport.webhooks`) then sends each endpoint, per ordering key, the
oldest delivery still pending; a rollout's rows are written under its row
lock, so their ids follow the order of its changes.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, update
from sqlmodel import Session, col, select

from ota.domain.webhooks import (
    DELIVERY_DEAD,
    DELIVERY_DELIVERED,
    DELIVERY_PENDING,
    Subscription,
)
from ota.errors import InvalidArgument, NotFound
from ota.store.models import WebhookDeliveryRow, WebhookEventRow, WebhookRow

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    # 32 random bytes: the HMAC-SHA256 key, base64 after the Standard Webhooks prefix.
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def subscription(row: WebhookRow) -> Subscription:
    return Subscription(tuple(json.loads(row.event_types_json)), row.feature, row.rollout_id)


def create(
    session: Session,
    *,
    url: str,
    event_types: Sequence[str],
    feature: str,
    rollout_id: str,
    description: str,
    creator: str,
    now: datetime,
) -> WebhookRow:
    row = WebhookRow(
        webhook_id="wh-" + secrets.token_hex(6),
        url=url,
        secret=new_secret(),
        event_types_json=json.dumps(list(event_types)),
        feature=feature,
        rollout_id=rollout_id,
        description=description,
        creator=creator,
        created_at=now,
    )
    session.add(row)
    session.flush()
    return row


def webhook_id_of(name: str) -> str:
    webhook_id = name.removeprefix("webhooks/")
    if not webhook_id or "/" in webhook_id:
        raise InvalidArgument(f"{name!r} is not a webhook name such as webhooks/ID", field="name")
    return webhook_id


def get(session: Session, webhook_id: str) -> WebhookRow:
    row = session.get(WebhookRow, webhook_id)
    if row is None:
        raise NotFound(f"webhook {webhook_id} does not exist", field="name")
    return row


def list_webhooks(session: Session, *, after: str, limit: int) -> Sequence[WebhookRow]:
    query = select(WebhookRow).where(col(WebhookRow.webhook_id) > after)
    return session.exec(query.order_by(col(WebhookRow.webhook_id)).limit(limit)).all()


def remove(session: Session, webhook_id: str) -> WebhookRow:
    """Delete an endpoint and what was still to be sent to it (history goes too)."""
    row = get(session, webhook_id)
    session.execute(
        delete(WebhookDeliveryRow).where(col(WebhookDeliveryRow.webhook_id) == webhook_id)
    )
    session.delete(row)
    return row


def enqueue(
    session: Session,
    event_type: str,
    *,
    data: dict[str, Any],
    ordering_key: str,
    now: datetime,
    feature: str = "",
    rollout_id: str = "",
) -> WebhookEventRow | None:
    """Record an event for every endpoint subscribed to it, in the caller's transaction.

    Nothing is written when nobody subscribes.
    """
    targets = [
        row.webhook_id
        for row in session.exec(select(WebhookRow))
        if subscription(row).wants(event_type, feature=feature, rollout_id=rollout_id)
    ]
    if not targets:
        return None
    event_id = "msg_" + secrets.token_hex(12)
    body = json.dumps(
        {"type": event_type, "timestamp": _iso(now), "data": data},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    event = WebhookEventRow(
        event_id=event_id, type=event_type, ordering_key=ordering_key, body=body, created_at=now
    )
    session.add(event)
    session.flush()
    assert event.id is not None
    for webhook_id in targets:
        session.add(
            WebhookDeliveryRow(
                webhook_id=webhook_id,
                event_id=event.id,
                ordering_key=ordering_key,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.flush()
    return event


def _iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Due:
    """A delivery to attempt now, with what signing and sending it needs."""

    delivery_id: int
    attempts: int
    url: str
    secret: str
    event_id: str
    body: str


def due(session: Session, now: datetime, *, scan: int = 2000) -> list[Due]:
    """The head of each (endpoint, ordering key) queue, if its next attempt is due.

    A queue whose head waits for a retry waits as a whole: later events of one
    rollout never overtake an earlier one. A dead delivery leaves the queue.
    """
    # The head of each queue, found in the database: a long queue of one endpoint
    # never hides the heads of the others.
    heads = (
        select(func.min(WebhookDeliveryRow.id))
        .where(WebhookDeliveryRow.state == DELIVERY_PENDING)
        .group_by(col(WebhookDeliveryRow.webhook_id), col(WebhookDeliveryRow.ordering_key))
    )
    ready = session.exec(
        select(WebhookDeliveryRow)
        .where(col(WebhookDeliveryRow.id).in_(heads))
        .where(col(WebhookDeliveryRow.next_attempt_at) <= now)
        .order_by(col(WebhookDeliveryRow.id))
        .limit(scan)
    ).all()
    if not ready:
        return []
    hooks = {
        h.webhook_id: h
        for h in session.exec(
            select(WebhookRow).where(col(WebhookRow.webhook_id).in_({r.webhook_id for r in ready}))
        )
    }
    events = {
        e.id: e
        for e in session.exec(
            select(WebhookEventRow).where(col(WebhookEventRow.id).in_({r.event_id for r in ready}))
        )
    }
    out = []
    for r in ready:
        hook, event = hooks.get(r.webhook_id), events.get(r.event_id)
        if hook is None or event is None or r.id is None:
            continue
        out.append(Due(r.id, r.attempts, hook.url, hook.secret, event.event_id, event.body))
    return out


def record_attempt(
    session: Session,
    delivery_id: int,
    *,
    ok: bool,
    status: int,
    error: str,
    now: datetime,
    retry_at: datetime | None,
) -> None:
    """The outcome of one attempt: delivered, retried at `retry_at`, or dead (None)."""
    values: dict[str, Any] = {
        "attempts": WebhookDeliveryRow.attempts + 1,
        "last_attempt_at": now,
        "last_status": status,
        "last_error": error[:500],
    }
    if ok:
        values |= {"state": DELIVERY_DELIVERED, "delivered_at": now}
    elif retry_at is None:
        values["state"] = DELIVERY_DEAD
    else:
        values["next_attempt_at"] = retry_at
    session.execute(
        update(WebhookDeliveryRow)
        .where(col(WebhookDeliveryRow.id) == delivery_id)
        .where(col(WebhookDeliveryRow.state) == DELIVERY_PENDING)
        .values(**values)
    )


@dataclass(frozen=True)
class DeliveryView:
    row: WebhookDeliveryRow
    event_id: str
    event_type: str


def list_deliveries(
    session: Session,
    webhook_id: str,
    *,
    states: Sequence[str],
    before: int,
    limit: int,
) -> list[DeliveryView]:
    """An endpoint's deliveries, newest first."""
    get(session, webhook_id)
    query = (
        select(WebhookDeliveryRow, WebhookEventRow.event_id, WebhookEventRow.type)
        .join(WebhookEventRow, col(WebhookEventRow.id) == col(WebhookDeliveryRow.event_id))
        .where(WebhookDeliveryRow.webhook_id == webhook_id)
    )
    if states:
        query = query.where(col(WebhookDeliveryRow.state).in_(states))
    if before:
        query = query.where(col(WebhookDeliveryRow.id) < before)
    query = query.order_by(col(WebhookDeliveryRow.id).desc()).limit(limit)
    return [DeliveryView(row, eid, etype) for row, eid, etype in session.exec(query)]


def redeliver(
    session: Session, webhook_id: str, *, event_id: str, dead_only: bool, now: datetime
) -> int:
    """Queue deliveries again (one event, or every dead one): a fresh set of attempts."""
    get(session, webhook_id)
    query = update(WebhookDeliveryRow).where(col(WebhookDeliveryRow.webhook_id) == webhook_id)
    if event_id:
        event = session.exec(
            select(WebhookEventRow).where(WebhookEventRow.event_id == event_id)
        ).first()
        if event is None:
            raise NotFound(f"event {event_id} does not exist", field="event_id")
        query = query.where(col(WebhookDeliveryRow.event_id) == event.id)
        if dead_only:
            query = query.where(col(WebhookDeliveryRow.state) == DELIVERY_DEAD)
    else:
        query = query.where(col(WebhookDeliveryRow.state) == DELIVERY_DEAD)
    result = session.execute(
        query.values(state=DELIVERY_PENDING, attempts=0, next_attempt_at=now, delivered_at=None)
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    if event_id and count == 0:
        raise NotFound(f"event {event_id} was never sent to webhook {webhook_id}", field="event_id")
    return count


def pending_count(session: Session) -> int:
    return int(
        session.exec(select(func.count()).where(WebhookDeliveryRow.state == DELIVERY_PENDING)).one()
    )
