"""`ota tokens`: operator API tokens, managed by admins over gRPC."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from ota.cli.connect import connect
from ota.cli.output import console, emit_json, emit_page, table
from ota.cli.prefix import paged, resolve
from ota.client import Client
from ota.domain.durations import DAYS_LIKE, parse_duration
from ota.v1 import token_pb2

ROLES = ("admin", "release", "viewer")


def register(nouns: Any, client_options: Callable[[argparse.ArgumentParser], None]) -> None:
    verbs = nouns.add_parser(
        "tokens",
        aliases=["token"],
        help="operator API tokens (admin)",
        description="Bearer tokens for operators and automation. The server keeps only a "
        "digest: a token is shown once, at creation. Revocation takes effect on the next "
        "call. Tokens in the server's config keep working (the bootstrap admin).",
    ).add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("create", help="a new token; prints it once")
    p.add_argument(
        "--role",
        required=True,
        choices=ROLES,
        help="viewer reads; release also publishes and runs rollouts; admin does everything",
    )
    p.add_argument("--name", required=True, help="who or what holds it (shown in the audit log)")
    p.add_argument(
        "--expires-in",
        default="",
        metavar="DURATION",
        help="lifetime: 30d, 12h, 90m, or never (default: 90d for release and viewer, "
        "never for admin)",
    )
    client_options(p)
    p.set_defaults(handler=tokens_create)
    p = verbs.add_parser("list", help="tokens, revoked and expired ones too")
    p.add_argument("--active", action="store_true", help="only tokens not revoked nor expired")
    client_options(p)
    p.set_defaults(handler=tokens_list)
    p = verbs.add_parser("revoke", help="revoke a token at once")
    p.add_argument(
        "token_id", metavar="ID", help="the token's id, tokens/ID, or a unique prefix of the id"
    )
    client_options(p)
    p.set_defaults(handler=tokens_revoke)


def _client(args: argparse.Namespace) -> Client:
    return connect(args)


def _when(ts: Timestamp, present: bool) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if present else "-"


def tokens_create(args: argparse.Namespace) -> int:
    request = token_pb2.CreateTokenRequest(
        token=token_pb2.Token(display_name=args.name, role=args.role)
    )
    if args.expires_in == "never":
        request.never_expires = True
    elif args.expires_in:
        request.ttl.FromTimedelta(
            timedelta(seconds=parse_duration(args.expires_in, field="--expires-in", like=DAYS_LIKE))
        )
    client = _client(args)
    response = client.tokens.CreateToken(request, metadata=client.metadata)
    if args.format == "json":
        emit_json(response)
    else:
        t = response.token
        expiry = (
            f"expires {_when(t.expire_time, True)}Z"
            if t.HasField("expire_time")
            else "never expires"
        )
        console.print(
            f"created token {t.token_id} ({t.display_name}, {t.role}, {expiry}); "
            "this is the only time it is shown:"
        )
        print(response.secret)  # plain, so a terminal never wraps or styles it
    return 0


def tokens_list(args: argparse.Namespace) -> int:
    client = _client(args)
    found: list[token_pb2.Token] = []
    page = ""
    while True:
        response = client.tokens.ListTokens(
            token_pb2.ListTokensRequest(page_token=page, active_only=args.active),
            metadata=client.metadata,
        )
        found.extend(response.tokens)
        page = response.next_page_token
        if not page:
            break
    if args.format == "json":
        emit_page("tokens", found)
    else:
        table(
            f"Tokens ({len(found)})",
            ["id", "name", "role", "created", "last used", "expires", "revoked"],
            [
                [
                    t.token_id,
                    t.display_name,
                    t.role,
                    _when(t.create_time, t.HasField("create_time")),
                    _when(t.last_use_time, t.HasField("last_use_time")),
                    _expiry(t),
                    _when(t.revoke_time, t.revoked),
                ]
                for t in found
            ],
        )
    return 0


def _expiry(t: token_pb2.Token) -> str:
    if not t.HasField("expire_time"):
        return "never"
    return _when(t.expire_time, True) + (" (expired)" if t.expired else "")


def tokens_revoke(args: argparse.Namespace) -> int:
    client = _client(args)
    given = args.token_id.removeprefix("tokens/")

    def page(token: str) -> tuple[list[str], str]:
        r = client.tokens.ListTokens(
            token_pb2.ListTokensRequest(page_token=token), metadata=client.metadata
        )
        return [t.token_id for t in r.tokens], r.next_page_token

    name = "tokens/" + resolve(given, paged(page), noun="token")
    t = client.tokens.RevokeToken(token_pb2.RevokeTokenRequest(name=name), metadata=client.metadata)
    if args.format == "json":
        emit_json(t)
    else:
        console.print(f"revoked token {t.token_id} ({t.display_name}, {t.role})")
    return 0
