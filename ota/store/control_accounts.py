"""The broker usernames control planes connect as (`ota.domain.accounts`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_
from sqlmodel import Session, col, select

from ota.store.models import ControlAccountRow, DeviceRow
from ota.store.upsert import replacing_insert


def record(session: Session, username: str, now: datetime) -> None:
    """Note that a control plane connects as `username` (idempotent; replicas may race)."""
    table = ControlAccountRow.__table__  # type: ignore[attr-defined]
    session.execute(
        replacing_insert(session, table, ["username"]),
        {"username": username, "recorded_at": now},
    )


def usernames(session: Session) -> list[str]:
    """Every username a control plane has connected as."""
    return list(session.exec(select(ControlAccountRow.username)))


def devices_in_namespace(session: Session, username: str, limit: int = 5) -> list[str]:
    """Registered devices named `username` or `username-*`: they would hold its accounts."""
    # LIKE's wildcards in a username ('_') are escaped: the match is literal.
    pattern = username.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "-%"
    query = (
        select(DeviceRow.device_id)
        .where(
            or_(
                col(DeviceRow.device_id) == username,
                col(DeviceRow.device_id).like(pattern, escape="\\"),
            )
        )
        .order_by(col(DeviceRow.device_id))
        .limit(limit)
    )
    return list(session.exec(query))
