"""`ota webhooks`: endpoints that receive rollout and bundle events (admin)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ota.cli.connect import connect
from ota.cli.output import console, emit_json, emit_page, plain, table
from ota.cli.prefix import paged, resolve
from ota.client import Client
from ota.domain.webhooks import DELIVERY_STATES, EVENT_TYPES
from ota.v1 import webhook_pb2

EXIT_FAILED = 1


def register(nouns: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    verbs = nouns.add_parser(
        "webhooks",
        aliases=["webhook"],
        help="HTTPS endpoints that receive rollout and bundle events (admin)",
        description="Signed HTTPS POSTs (Standard Webhooks headers) of rollout and bundle "
        "events, at least once, in order per rollout, retried with backoff, then parked as "
        "dead until redelivered. Event types: " + ", ".join(EVENT_TYPES) + ".",
    ).add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("add", help="a new endpoint; prints its signing secret once")
    p.add_argument("url", help="https://... (http:// only to localhost, if the server allows)")
    p.add_argument(
        "--event",
        action="append",
        default=[],
        metavar="TYPE",
        help="an event type to receive (repeat; default: every event)",
    )
    p.add_argument("--feature", default="", help="only events of this feature")
    p.add_argument("--rollout", default="", help="only events of this rollout")
    p.add_argument("--description", default="", help="what it is for")
    client_options(p)
    p.set_defaults(handler=webhooks_add)
    p = verbs.add_parser("list", help="endpoints")
    client_options(p)
    p.set_defaults(handler=webhooks_list)
    p = verbs.add_parser("remove", help="remove an endpoint and its queued deliveries")
    p.add_argument(
        "webhook_id",
        metavar="ID",
        help="the endpoint's id (from `ota webhooks list`), or a unique prefix of it",
    )
    client_options(p)
    p.set_defaults(handler=webhooks_remove)
    p = verbs.add_parser("test", help="send a signed webhook.test event now")
    p.add_argument(
        "webhook_id",
        metavar="ID",
        help="the endpoint's id (from `ota webhooks list`), or a unique prefix of it",
    )
    client_options(p)
    p.set_defaults(handler=webhooks_test)
    p = verbs.add_parser("deliveries", help="an endpoint's deliveries, newest first")
    p.add_argument(
        "webhook_id",
        metavar="ID",
        help="the endpoint's id (from `ota webhooks list`), or a unique prefix of it",
    )
    p.add_argument(
        "--state",
        action="append",
        default=[],
        choices=DELIVERY_STATES,
        help="only deliveries in this state (repeat; default all)",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    client_options(p)
    p.set_defaults(handler=webhooks_deliveries)
    p = verbs.add_parser("redeliver", help="queue deliveries again: one event, or every dead one")
    p.add_argument(
        "webhook_id",
        metavar="ID",
        help="the endpoint's id (from `ota webhooks list`), or a unique prefix of it",
    )
    p.add_argument(
        "--event", default="", metavar="EVENT_ID", help="this event (default: dead ones)"
    )
    client_options(p)
    p.set_defaults(handler=webhooks_redeliver)


def _name(client: Client, webhook_id: str) -> str:
    """The webhook's resource name, from its id, its name or a unique prefix of its id."""
    given = webhook_id.removeprefix("webhooks/")

    def page(token: str) -> tuple[list[str], str]:
        r = client.webhooks.ListWebhooks(
            webhook_pb2.ListWebhooksRequest(page_token=token), metadata=client.metadata
        )
        return [w.webhook_id for w in r.webhooks], r.next_page_token

    return "webhooks/" + resolve(given, paged(page), noun="webhook")


def _when(ts: Timestamp, present: bool) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if present else "-"


def webhooks_add(args: argparse.Namespace) -> int:
    client = connect(args)
    response = client.webhooks.CreateWebhook(
        webhook_pb2.CreateWebhookRequest(
            webhook=webhook_pb2.Webhook(
                url=args.url,
                event_types=args.event,
                feature=args.feature,
                rollout_id=args.rollout,
                description=args.description,
            )
        ),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json({"webhook": plain(response.webhook), "secret": response.secret})
    else:
        w = response.webhook
        console.print(
            f"added webhook {w.webhook_id} → {w.url}; its signing secret, shown this once:"
        )
        print(response.secret)  # plain, so a terminal never wraps or styles it
    return 0


def webhooks_list(args: argparse.Namespace) -> int:
    client = connect(args)
    found: list[webhook_pb2.Webhook] = []
    page = ""
    while True:
        response = client.webhooks.ListWebhooks(
            webhook_pb2.ListWebhooksRequest(page_token=page), metadata=client.metadata
        )
        found.extend(response.webhooks)
        page = response.next_page_token
        if not page:
            break
    if args.format == "json":
        emit_page("webhooks", found)
        return 0
    table(
        f"Webhooks ({len(found)})",
        ["id", "url", "events", "feature", "rollout", "created", "by"],
        [
            [
                w.webhook_id,
                w.url,
                ", ".join(w.event_types) or "all",
                w.feature or "any",
                w.rollout_id or "any",
                _when(w.create_time, w.HasField("create_time")),
                w.creator,
            ]
            for w in found
        ],
        whole=(0, 1),
    )
    return 0


def webhooks_remove(args: argparse.Namespace) -> int:
    client = connect(args)
    w = client.webhooks.DeleteWebhook(
        webhook_pb2.DeleteWebhookRequest(name=_name(client, args.webhook_id)),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json({"webhook": plain(w)})
    else:
        console.print(f"removed webhook {w.webhook_id} ({w.url})")
    return 0


def webhooks_test(args: argparse.Namespace) -> int:
    client = connect(args)
    r = client.webhooks.TestWebhook(
        webhook_pb2.TestWebhookRequest(name=_name(client, args.webhook_id)),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json(plain(r))
    elif r.ok:
        console.print(f"delivered {r.event_id}: HTTP {r.status_code}")
    else:
        console.print(f"not delivered ({r.event_id}): {r.error}")
    return 0 if r.ok else EXIT_FAILED


def webhooks_deliveries(args: argparse.Namespace) -> int:
    client = connect(args)
    found: list[webhook_pb2.Delivery] = []
    page = ""
    while len(found) < args.limit:
        response = client.webhooks.ListDeliveries(
            webhook_pb2.ListDeliveriesRequest(
                name=_name(client, args.webhook_id),
                states=args.state,
                page_size=min(args.limit - len(found), 1000),
                page_token=page,
            ),
            metadata=client.metadata,
        )
        found.extend(response.deliveries)
        page = response.next_page_token
        if not page:
            break
    if args.format == "json":
        emit_page("deliveries", found, page)
        return 0
    table(
        f"Deliveries of {args.webhook_id} ({len(found)})",
        ["event", "type", "state", "attempts", "last status", "last attempt", "next", "error"],
        [
            [
                d.event_id,
                d.event_type,
                d.state,
                d.attempts,
                d.last_status or "-",
                _when(d.last_attempt_time, d.HasField("last_attempt_time")),
                _when(d.next_attempt_time, d.HasField("next_attempt_time")),
                d.last_error or "",
            ]
            for d in found
        ],
    )
    return 0


def webhooks_redeliver(args: argparse.Namespace) -> int:
    client = connect(args)
    r = client.webhooks.Redeliver(
        webhook_pb2.RedeliverRequest(name=_name(client, args.webhook_id), event_id=args.event),
        metadata=client.metadata,
    )
    if args.format == "json":
        emit_json(plain(r))
    else:
        what = f"event {args.event}" if args.event else "dead deliveries"
        console.print(f"queued {r.queued} {what} again")
    return 0
