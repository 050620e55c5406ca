"""TokenService: admins create, list and revoke operator API tokens."""

from __future__ import annotations

import logging

import grpc

from ota.api import convert
from ota.api.auth import OPERATORS, Authenticator
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.errors import InvalidArgument
from ota.store import tokens
from ota.store.models import ApiTokenRow
from ota.store.session import Store
from ota.v1 import token_pb2, token_pb2_grpc

log = logging.getLogger(__name__)

MAX_DISPLAY_NAME = 128


def token_message(row: ApiTokenRow) -> token_pb2.Token:
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
        creator = self._auth.caller(context).name
        with self._store.transaction() as session:
            issued = tokens.create(
                session,
                display_name=name,
                role=wanted.role,
                creator=creator,
                now=self._clock.now(),
            )
        log.info("token %s (%s, %s) created by %s", issued.row.token_id, name, wanted.role, creator)
        return token_pb2.CreateTokenResponse(token=token_message(issued.row), secret=issued.secret)

    def ListTokens(
        self, request: token_pb2.ListTokensRequest, context: grpc.ServicerContext
    ) -> token_pb2.ListTokensResponse:
        scope = f"active_only={request.active_only}"
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope=scope)
        with self._store.transaction() as session:
            rows = list(
                tokens.list_tokens(
                    session, after=after, limit=size + 1, active_only=request.active_only
                )
            )
        more = len(rows) > size
        rows = rows[:size]
        return token_pb2.ListTokensResponse(
            tokens=[token_message(r) for r in rows],
            next_page_token=page_token(rows[-1].token_id, scope=scope) if more else "",
        )

    def RevokeToken(
        self, request: token_pb2.RevokeTokenRequest, context: grpc.ServicerContext
    ) -> token_pb2.Token:
        token_id = tokens.token_id_of(request.name)
        with self._store.transaction() as session:
            row = tokens.revoke(session, token_id, self._clock.now())
        log.info("token %s revoked by %s", token_id, self._auth.caller(context).name)
        return token_message(row)
