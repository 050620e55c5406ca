"""TokenService: admins create, list and revoke operator API tokens."""

from __future__ import annotations

from datetime import datetime, timedelta

import grpc

from ota.api import convert
from ota.api.auth import ADMIN, OPERATORS, RELEASE, VIEWER, Authenticator
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.errors import InvalidArgument
from ota.store import audit, tokens
from ota.store.models import ApiTokenRow
from ota.store.session import Store
from ota.v1 import token_pb2, token_pb2_grpc

MAX_DISPLAY_NAME = 128
# Tokens of people and pipelines that only release or read expire unless told
# otherwise; admin tokens (few, and needed to mint the others) do not.
DEFAULT_TTL: dict[str, timedelta | None] = {
    ADMIN: None,
    RELEASE: timedelta(days=90),
    VIEWER: timedelta(days=90),
}
MAX_TTL = timedelta(days=3650)


def lifetime(role: str, ttl: timedelta | None, *, never: bool) -> timedelta | None:
    """How long a new token of `role` lives: asked for, never, or the role's default."""
    if never and ttl is not None:
        raise InvalidArgument("give a ttl or never_expires, not both", field="ttl")
    if never:
        return None
    if ttl is None:
        return DEFAULT_TTL[role]
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise InvalidArgument(
            f"must be positive and at most {MAX_TTL.days} days, got {ttl}", field="ttl"
        )
    return ttl


def token_message(row: ApiTokenRow, now: datetime | None = None) -> token_pb2.Token:
    return token_pb2.Token(
        name=f"tokens/{row.token_id}",
        token_id=row.token_id,
        display_name=row.display_name,
        role=row.role,
        create_time=convert.ts(row.created_at),
        last_use_time=convert.ts(row.last_used_at),
        revoke_time=convert.ts(row.revoked_at),
        revoked=row.revoked_at is not None,
        creator=row.creator,
        expire_time=convert.ts(row.expires_at),
        expired=now is not None and tokens.expired(row, now),
    )


class TokenServicer(token_pb2_grpc.TokenServiceServicer):
    def __init__(self, store: Store, clock: Clock, auth: Authenticator) -> None:
        self._store = store
        self._clock = clock
        self._auth = auth

    def CreateToken(
        self, request: token_pb2.CreateTokenRequest, context: grpc.ServicerContext
    ) -> token_pb2.CreateTokenResponse:
        wanted = request.token
        name = wanted.display_name.strip()
        if not name:
            raise InvalidArgument("is required", field="token.display_name")
        if len(name) > MAX_DISPLAY_NAME or not name.isprintable():
            raise InvalidArgument(
                f"must be printable and at most {MAX_DISPLAY_NAME} characters",
                field="token.display_name",
            )
        if wanted.role not in OPERATORS:
            raise InvalidArgument(
                f"{wanted.role!r} is not one of {', '.join(sorted(OPERATORS))}",
                field="token.role",
            )
        ttl = request.ttl.ToTimedelta() if request.HasField("ttl") else None
        life = lifetime(wanted.role, ttl, never=request.never_expires)
        creator = self._auth.caller(context).name
        now = self._clock.now()
        with self._store.transaction() as session:
            issued = tokens.create(
                session,
                display_name=name,
                role=wanted.role,
                creator=creator,
                now=now,
                expires_at=now + life if life is not None else None,
            )
            audit.record(
                session,
                "token",
                issued.row.token_id,
                "create",
                now=now,
                reason=f"{name}, {wanted.role}, "
                + (f"expires {issued.row.expires_at:%Y-%m-%d %H:%M}Z" if life else "never expires"),
                detail={"display_name": name, "role": wanted.role},
            )
        return token_pb2.CreateTokenResponse(
            token=token_message(issued.row, now), secret=issued.secret
        )

    def ListTokens(
        self, request: token_pb2.ListTokensRequest, context: grpc.ServicerContext
    ) -> token_pb2.ListTokensResponse:
        scope = f"active_only={request.active_only}"
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope=scope)
        now = self._clock.now()
        with self._store.transaction() as session:
            rows = list(
                tokens.list_tokens(
                    session, after=after, limit=size + 1, active_only=request.active_only, now=now
                )
            )
        more = len(rows) > size
        rows = rows[:size]
        return token_pb2.ListTokensResponse(
            tokens=[token_message(r, now) for r in rows],
            next_page_token=page_token(rows[-1].token_id, scope=scope) if more else "",
        )

    def RevokeToken(
        self, request: token_pb2.RevokeTokenRequest, context: grpc.ServicerContext
    ) -> token_pb2.Token:
        token_id = tokens.token_id_of(request.name)
        with self._store.transaction() as session:
            row = tokens.revoke(session, token_id, self._clock.now())
            audit.record(
                session,
                "token",
                token_id,
                "revoke",
                now=self._clock.now(),
                reason=f"{row.display_name}, {row.role}",
            )
        return token_message(row, self._clock.now())
