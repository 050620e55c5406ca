"""`ota audit`: who did what to which object, when, from where (admin)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ota.cli.connect import connect
from ota.cli.output import emit_page, table
from ota.domain.durations import DAYS_LIKE, parse_duration
from ota.errors import InvalidArgument
from ota.store.audit import OBJECT_TYPES
from ota.v1 import audit_pb2


def register(nouns: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    p = nouns.add_parser(
        "audit",
        help="the audit log of every object (admin)",
        description="Who did what, when and from which address: rollouts, bundles "
        "(publish, sign, discard), keys (rotate), tokens (create, revoke), devices "
        "(register, revoke), webhooks (add, remove, redeliver). Newest first.",
    )
    p.add_argument(
        "--object",
        default="",
        metavar="TYPE[/ID]",
        help=f"one kind ({', '.join(OBJECT_TYPES)}) or one object, e.g. token/3f9c0d2a1b4e5f60 "
        "or bundle/bundles/wipers/2.0.0",
    )
    p.add_argument("--actor", default="", help="only what this actor did")
    p.add_argument(
        "--since", default="", metavar="WHEN", help="24h, 7d, ... ago, or a time 2026-12-01T09:00"
    )
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    client_options(p)
    p.set_defaults(handler=audit_list)


def _since(text: str) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return datetime.now(UTC) - timedelta(
            seconds=parse_duration(text, field="--since", like=DAYS_LIKE)
        )
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def audit_list(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise InvalidArgument("must be at least 1", field="--limit")
    object_type, _, object_id = args.object.partition("/")
    request = audit_pb2.ListAuditEntriesRequest(
        object_type=object_type, object_id=object_id, actor=args.actor
    )
    since = _since(args.since)
    if since is not None:
        request.since.FromDatetime(since)
    client = connect(args)
    found: list[audit_pb2.AuditEntry] = []
    while len(found) < args.limit:
        request.page_size = min(args.limit - len(found), 1000)
        response = client.audit.ListAuditEntries(request, metadata=client.metadata)
        found.extend(response.entries)
        request.page_token = response.next_page_token
        if not request.page_token:
            break
    if args.format == "json":
        emit_page("entries", found, request.page_token)
        return 0
    table(
        f"Audit ({len(found)})",
        ["time", "object", "action", "actor", "address", "reason"],
        [
            [
                e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                f"{e.object_type} {e.object_id}",
                e.action,
                e.actor,
                e.address,
                e.reason,
            ]
            for e in found
        ],
        whole=(1,),
    )
    return 0
