"""AuditService: the audit log of every object, filtered, newest first."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import grpc

from ota.api import convert
from ota.api.paging import page_after, page_size, page_token
from ota.errors import InvalidArgument
from ota.store import audit
from ota.store.session import Store
from ota.v1 import audit_pb2, audit_pb2_grpc


def entry_message(e: audit.Entry) -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(
        time=convert.ts(e.time),
        object_type=e.object_type,
        object_id=e.object_id,
        action=e.action,
        actor=e.actor,
        address=e.address,
        reason=e.reason,
        detail_json=json.dumps(e.detail, sort_keys=True, default=str) if e.detail else "",
    )


def _cursor(key: tuple[datetime, str, int]) -> str:
    return f"{key[0].isoformat()}|{key[1]}|{key[2]}"


def _parse_cursor(text: str) -> tuple[datetime, str, int] | None:
    if not text:
        return None
    when, table, row_id = text.split("|")
    return datetime.fromisoformat(when), table, int(row_id)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    def ListAuditEntries(
        self, request: audit_pb2.ListAuditEntriesRequest, context: grpc.ServicerContext
    ) -> audit_pb2.ListAuditEntriesResponse:
        if request.object_type and request.object_type not in audit.OBJECT_TYPES:
            raise InvalidArgument(
                f"{request.object_type!r} is not one of {', '.join(audit.OBJECT_TYPES)}",
                field="object_type",
            )
        if request.object_id and not request.object_type:
            raise InvalidArgument("needs object_type", field="object_id")
        since = request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None
        size = page_size(request.page_size)
        scope = "|".join([request.object_type, request.object_id, request.actor, str(since or "")])
        before = _parse_cursor(page_after(request.page_token, scope=scope))
        with self._store.transaction() as session:
            found = audit.entries(
                session,
                object_type=request.object_type,
                object_id=request.object_id,
                actor=request.actor,
                since=since,
                before=before,
                limit=size + 1,
            )
        more = len(found) > size
        found = found[:size]
        return audit_pb2.ListAuditEntriesResponse(
            entries=[entry_message(e) for e in found],
            next_page_token=page_token(_cursor(found[-1].key), scope=scope) if more else "",
        )
