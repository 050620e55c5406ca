"""Identifiers given by a unique prefix, as people copy them from a table.

The server is asked for the identifier as given first: a full identifier costs
nothing more, and an exact match always wins over a longer identifier it
happens to prefix. Only when the server answers NOT_FOUND does the CLI list the
identifiers of that kind and look for the one that starts with what was given;
then it asks again with the full identifier. Several candidates are an error
naming them all, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import grpc

from ota.errors import InvalidArgument

T = TypeVar("T")
SHOWN = 5  # candidates named in an ambiguity error


def unique_match(given: str, ids: Iterable[str], *, noun: str) -> str | None:
    """The one identifier starting with `given`; None when there is none."""
    found = sorted({i for i in ids if i.startswith(given)})
    if len(found) > 1:
        named = ", ".join(found[:SHOWN]) + (
            f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        )
        raise InvalidArgument(
            f"{given!r} is the start of {len(found)} {noun}s: {named}", field=noun
        )
    return found[0] if found else None


def by_prefix(
    call: Callable[[str], T], given: str, ids: Callable[[], Iterable[str]], *, noun: str
) -> T:
    """`call(id)`, with `given` taken as a whole identifier, else as a unique prefix."""
    try:
        return call(given)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND or not given:
            raise
        full = unique_match(given, ids(), noun=noun)
        if full is None or full == given:
            raise
    return call(full)


def paged(fetch: Callable[[str], tuple[Iterable[str], str]]) -> Iterable[str]:
    """Every identifier of a list RPC: `fetch(page_token)` gives a page's ids and the next."""
    token = ""
    while True:
        ids, token = fetch(token)
        yield from ids
        if not token:
            return


def resolve(given: str, ids: Iterable[str], *, noun: str) -> str:
    """The full identifier `given` stands for, from a short list read up front (webhooks,
    tokens); `given` itself when it names one exactly or starts none (the server then
    answers NOT_FOUND)."""
    every = list(ids)
    if given in every:
        return given
    return unique_match(given, every, noun=noun) or given
