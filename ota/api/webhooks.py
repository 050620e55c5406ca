"""WebhookService: admins add, list, remove and test endpoints, and see their deliveries."""

from __future__ import annotations

import json
import secrets

import grpc

from ota.api import convert
from ota.api.auth import Authenticator
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.domain import webhooks as rules
from ota.errors import InvalidArgument
from ota.store import audit, webhooks
from ota.store.models import WebhookRow
from ota.store.session import Store
from ota.transport.webhooks import Sender
from ota.v1 import webhook_pb2, webhook_pb2_grpc

MAX_DESCRIPTION = 200


def webhook_message(row: WebhookRow) -> webhook_pb2.Webhook:
    return webhook_pb2.Webhook(
        name=f"webhooks/{row.webhook_id}",
        webhook_id=row.webhook_id,
        url=row.url,
        event_types=json.loads(row.event_types_json),
        feature=row.feature,
        rollout_id=row.rollout_id,
        description=row.description,
        create_time=convert.ts(row.created_at),
        creator=row.creator,
    )


def delivery_message(view: webhooks.DeliveryView) -> webhook_pb2.Delivery:
    row = view.row
    return webhook_pb2.Delivery(
        delivery_id=row.id or 0,
        webhook_id=row.webhook_id,
        event_id=view.event_id,
        event_type=view.event_type,
        state=row.state,
        attempts=row.attempts,
        last_status=row.last_status,
        last_error=row.last_error,
        create_time=convert.ts(row.created_at),
        last_attempt_time=convert.ts(row.last_attempt_at),
        next_attempt_time=convert.ts(
            row.next_attempt_at if row.state == rules.DELIVERY_PENDING else None
        ),
        deliver_time=convert.ts(row.delivered_at),
    )


class WebhookServicer(webhook_pb2_grpc.WebhookServiceServicer):
    def __init__(
        self,
        store: Store,
        clock: Clock,
        auth: Authenticator,
        sender: Sender,
        *,
        allow_http: bool = False,
    ) -> None:
        self._store = store
        self._clock = clock
        self._auth = auth
        self._sender = sender
        self._allow_http = allow_http

    def CreateWebhook(
        self, request: webhook_pb2.CreateWebhookRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.CreateWebhookResponse:
        wanted = request.webhook
        url = rules.check_url(wanted.url, allow_http=self._allow_http)
        types = rules.check_event_types(list(wanted.event_types))
        description = wanted.description.strip()
        if len(description) > MAX_DESCRIPTION or not description.isprintable():
            raise InvalidArgument(
                f"must be printable and at most {MAX_DESCRIPTION} characters",
                field="webhook.description",
            )
        for name, value, width in (
            ("feature", wanted.feature, 64),
            ("rollout_id", wanted.rollout_id, 32),
        ):
            if len(value) > width or not value.isprintable():
                raise InvalidArgument(
                    f"must be printable and at most {width} characters", field=f"webhook.{name}"
                )
        creator = self._auth.caller(context).name
        with self._store.transaction() as session:
            row = webhooks.create(
                session,
                url=url,
                event_types=types,
                feature=wanted.feature,
                rollout_id=wanted.rollout_id,
                description=description,
                creator=creator,
                now=self._clock.now(),
            )
            audit.record(
                session,
                "webhook",
                row.webhook_id,
                "add",
                now=self._clock.now(),
                reason=f"{url}: {', '.join(types) or 'every event'}",
                detail={
                    "url": url,
                    "event_types": list(types),
                    "feature": wanted.feature,
                    "rollout_id": wanted.rollout_id,
                },
            )
        return webhook_pb2.CreateWebhookResponse(webhook=webhook_message(row), secret=row.secret)

    def ListWebhooks(
        self, request: webhook_pb2.ListWebhooksRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.ListWebhooksResponse:
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope="webhooks")
        with self._store.transaction() as session:
            rows = list(webhooks.list_webhooks(session, after=after, limit=size + 1))
        more = len(rows) > size
        rows = rows[:size]
        return webhook_pb2.ListWebhooksResponse(
            webhooks=[webhook_message(r) for r in rows],
            next_page_token=page_token(rows[-1].webhook_id, scope="webhooks") if more else "",
        )

    def DeleteWebhook(
        self, request: webhook_pb2.DeleteWebhookRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.Webhook:
        webhook_id = webhooks.webhook_id_of(request.name)
        with self._store.transaction() as session:
            row = webhooks.remove(session, webhook_id)
            audit.record(
                session, "webhook", webhook_id, "remove", now=self._clock.now(), reason=row.url
            )
        return webhook_message(row)

    def TestWebhook(
        self, request: webhook_pb2.TestWebhookRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.TestWebhookResponse:
        webhook_id = webhooks.webhook_id_of(request.name)
        with self._store.transaction() as session:
            row = webhooks.get(session, webhook_id)
        now = self._clock.now()
        event_id = "msg_test_" + secrets.token_hex(8)
        body = json.dumps(
            {
                "type": rules.WEBHOOK_TEST,
                "timestamp": now.isoformat().replace("+00:00", "Z"),
                "data": {"webhook_id": webhook_id, "actor": self._auth.caller(context).name},
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        outcome = self._sender.send(row.url, row.secret, event_id, body, now)
        return webhook_pb2.TestWebhookResponse(
            ok=outcome.ok, status_code=outcome.status, error=outcome.error, event_id=event_id
        )

    def ListDeliveries(
        self, request: webhook_pb2.ListDeliveriesRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.ListDeliveriesResponse:
        webhook_id = webhooks.webhook_id_of(request.name)
        states = rules.states_of(list(request.states))
        size = page_size(request.page_size)
        scope = f"{webhook_id}:{','.join(sorted(states))}"
        before = page_after(request.page_token, scope=scope)
        with self._store.transaction() as session:
            views = webhooks.list_deliveries(
                session, webhook_id, states=states, before=int(before or 0), limit=size + 1
            )
        more = len(views) > size
        views = views[:size]
        return webhook_pb2.ListDeliveriesResponse(
            deliveries=[delivery_message(v) for v in views],
            next_page_token=page_token(str(views[-1].row.id), scope=scope) if more else "",
        )

    def Redeliver(
        self, request: webhook_pb2.RedeliverRequest, context: grpc.ServicerContext
    ) -> webhook_pb2.RedeliverResponse:
        webhook_id = webhooks.webhook_id_of(request.name)
        with self._store.transaction() as session:
            queued = webhooks.redeliver(
                session,
                webhook_id,
                event_id=request.event_id,
                dead_only=False,
                now=self._clock.now(),
            )
            audit.record(
                session,
                "webhook",
                webhook_id,
                "redeliver",
                now=self._clock.now(),
                reason=f"{queued} deliveries of "
                + (f"event {request.event_id}" if request.event_id else "dead events"),
            )
        return webhook_pb2.RedeliverResponse(queued=queued)
