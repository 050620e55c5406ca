"""The audit log of every object: who did what, when, from which address.

Rollouts keep their own detailed log (`rollout_audit`, written by
`ota.store.rollouts`); every other object's changes go to `audit_entry`
through `record`, in the transaction of the change. Who and from where come
from the request being served (`requester`, set by the gRPC interceptor); a
change made by the system itself is the `system`'s. Each entry is logged at
INFO once its transaction commits (`ota.store.session`), never for a change
that was rolled back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from ota.clock import utc
from ota.store.models import AuditEntryRow, RolloutAuditRow

log = logging.getLogger("ota.audit")

SYSTEM = "system"
# Object types of `audit_entry`, and "rollout" for `rollout_audit`.
OBJECT_TYPES = ("bundle", "keys", "token", "device", "webhook", "rollout")
AFTER_COMMIT = "ota_after_commit_logs"


@dataclass(frozen=True)
class Requester:
    actor: str
    address: str = ""


_REQUESTER: ContextVar[Requester | None] = ContextVar("ota_requester", default=None)


def requester() -> Requester:
    return _REQUESTER.get() or Requester(SYSTEM)


@contextmanager
def serving(who: Requester) -> Iterator[None]:
    """Attribute the audit entries written while serving one request to `who`."""
    token = _REQUESTER.set(who)
    try:
        yield
    finally:
        _REQUESTER.reset(token)


def record(
    session: Session,
    object_type: str,
    object_id: str,
    action: str,
    *,
    now: datetime,
    reason: str = "",
    detail: dict[str, Any] | None = None,
    logged: bool = True,
) -> AuditEntryRow:
    who = requester()
    row = AuditEntryRow(
        time=now,
        actor=who.actor,
        address=who.address,
        object_type=object_type,
        object_id=object_id,
        action=action,
        reason=reason,
        detail=detail,
    )
    session.add(row)
    if logged:
        after_commit(
            session,
            f"audit: {object_type} {object_id} {action} by {who.actor}"
            + (f" from {who.address}" if who.address else "")
            + (f": {reason}" if reason else ""),
        )
    return row


def after_commit(session: Session, line: str) -> None:
    """An INFO line to log once the session's transaction has committed."""
    session.info.setdefault(AFTER_COMMIT, []).append(line)


def flush_logs(session: Session) -> None:
    for line in session.info.pop(AFTER_COMMIT, []):
        log.info("%s", line)


@dataclass(frozen=True)
class Entry:
    """One line of `ota audit`: an object's entry or a rollout's."""

    key: tuple[datetime, str, int]  # newest first: (time, table, id), descending
    time: datetime
    object_type: str
    object_id: str
    action: str
    actor: str
    address: str
    reason: str
    detail: dict[str, Any] | None


def entries(
    session: Session,
    *,
    object_type: str,
    object_id: str,
    actor: str,
    since: datetime | None,
    before: tuple[datetime, str, int] | None,
    limit: int,
) -> list[Entry]:
    """Both logs, filtered, newest first, from just after `before`."""
    found: list[Entry] = []
    if object_type in ("", "rollout"):
        q = select(RolloutAuditRow)
        if object_id:
            q = q.where(RolloutAuditRow.rollout_id == object_id)
        if actor:
            q = q.where(RolloutAuditRow.actor == actor)
        if since is not None:
            q = q.where(col(RolloutAuditRow.time) >= since)
        if before is not None:
            q = q.where(col(RolloutAuditRow.time) <= before[0])
        q = q.order_by(col(RolloutAuditRow.time).desc(), col(RolloutAuditRow.id).desc())
        for r in session.exec(q.limit(limit + 50)):
            found.append(
                Entry(
                    (_utc(r.time), "rollout", r.id or 0),
                    _utc(r.time),
                    "rollout",
                    r.rollout_id,
                    r.action,
                    r.actor,
                    r.address,
                    r.reason,
                    r.diff,
                )
            )
    if object_type != "rollout":
        o = select(AuditEntryRow)
        if object_type:
            o = o.where(AuditEntryRow.object_type == object_type)
        if object_id:
            o = o.where(AuditEntryRow.object_id == object_id)
        if actor:
            o = o.where(AuditEntryRow.actor == actor)
        if since is not None:
            o = o.where(col(AuditEntryRow.time) >= since)
        if before is not None:
            o = o.where(col(AuditEntryRow.time) <= before[0])
        o = o.order_by(col(AuditEntryRow.time).desc(), col(AuditEntryRow.id).desc())
        for e in session.exec(o.limit(limit + 50)):
            found.append(
                Entry(
                    (_utc(e.time), "object", e.id or 0),
                    _utc(e.time),
                    e.object_type,
                    e.object_id,
                    e.action,
                    e.actor,
                    e.address,
                    e.reason,
                    e.detail,
                )
            )
    found.sort(key=lambda x: x.key, reverse=True)
    if before is not None:
        found = [x for x in found if x.key < before]
    return found[:limit]


def _utc(when: datetime) -> datetime:
    return utc(when)
