"""Operator API tokens: created with a random secret, kept as a digest, revoked at once."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_
from sqlmodel import Session, col, select

from ota.clock import utc
from ota.errors import InvalidArgument, NotFound
from ota.store.changes import token_revoked
from ota.store.models import ApiTokenRow

PREFIX = "ota_"
# last_used_at is a hint for spotting idle tokens, not an audit trail: writing
# it at most once a minute keeps a busy token from making every call a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class IssuedToken:
    row: ApiTokenRow
    secret: str


def digest(token: str) -> str:
    # Tokens carry 256 random bits, so a plain digest is enough (no key stretching).
    return hashlib.sha256(token.encode()).hexdigest()


def create(
    session: Session,
    *,
    display_name: str,
    role: str,
    creator: str,
    now: datetime,
    expires_at: datetime | None = None,
) -> IssuedToken:
    token_id = secrets.token_hex(8)
    secret = PREFIX + secrets.token_hex(32)  # never starts with "-" or "device:"
    row = ApiTokenRow(
        token_id=token_id,
        token_sha256=digest(secret),
        display_name=display_name,
        role=role,
        creator=creator,
        created_at=now,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return IssuedToken(row, secret)


def list_tokens(
    session: Session, *, after: str, limit: int, active_only: bool, now: datetime | None = None
) -> Sequence[ApiTokenRow]:
    query = select(ApiTokenRow).where(col(ApiTokenRow.token_id) > after)
    if active_only:
        query = query.where(col(ApiTokenRow.revoked_at).is_(None))
        if now is not None:
            query = query.where(
                or_(col(ApiTokenRow.expires_at).is_(None), col(ApiTokenRow.expires_at) > now)
            )
    return session.exec(query.order_by(col(ApiTokenRow.token_id)).limit(limit)).all()


def token_id_of(name: str) -> str:
    token_id = name.removeprefix("tokens/")
    if not token_id or "/" in token_id:
        raise InvalidArgument(f"{name!r} is not a token name such as tokens/ID", field="name")
    return token_id


def revoke(session: Session, token_id: str, now: datetime) -> ApiTokenRow:
    row = session.get(ApiTokenRow, token_id)
    if row is None:
        raise NotFound(f"token {token_id} does not exist", field="name")
    if row.revoked_at is None:
        row.revoked_at = now
        session.add(row)
    token_revoked(session, token_id)  # every replica forgets it once this commits
    return row


def expired(row: ApiTokenRow, now: datetime) -> bool:
    return row.expires_at is not None and now >= utc(row.expires_at)


def authenticate(session: Session, token: str, now: datetime) -> ApiTokenRow | None:
    """The token row for `token`, recording its use if it is live; None if unknown or revoked.

    An expired row is returned unused: the caller refuses it with its own message.
    """
    row = session.exec(
        select(ApiTokenRow).where(ApiTokenRow.token_sha256 == digest(token))
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    if expired(row, now):
        return row
    if row.last_used_at is None or now - utc(row.last_used_at) >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.add(row)
    return row
