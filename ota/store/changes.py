"""What a transaction changed that other processes keep in memory, told once it commits.

Every writer of a rollout's row or of its progress rows marks the rollout in
its transaction (`rollout_changed`); a token's revocation marks the token
(`token_revoked`). When the transaction commits, this process's listeners
hear of it (`subscribe`); on PostgreSQL the transaction also ran
`pg_notify(channel, id)` just before its commit, so every replica listening
on the channel hears of it too, and only if it committed (`ota.store.notices`).
Marking in the store, not in each caller, means a new writer cannot forget it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Collection

from sqlalchemy import Engine, text
from sqlmodel import Session

log = logging.getLogger(__name__)

# NOTIFY channels; each payload is one id.
ROLLOUTS = "ota_rollout"  # a rollout id: its row or its progress changed
TOKENS = "ota_token"  # an API token id: it was revoked
CHANNELS = (ROLLOUTS, TOKENS)
_KEY = "ota.changes"

Listener = Callable[[Collection[str]], None]
_LISTENERS: weakref.WeakKeyDictionary[Engine, dict[str, list[Listener]]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def rollout_changed(session: Session, rollout_id: str) -> None:
    """Mark a rollout changed by this transaction (its row, or its progress)."""
    _mark(session, ROLLOUTS, rollout_id)


def token_revoked(session: Session, token_id: str) -> None:
    _mark(session, TOKENS, token_id)


def _mark(session: Session, channel: str, key: str) -> None:
    marked: dict[str, set[str]] = session.info.setdefault(_KEY, {})
    marked.setdefault(channel, set()).add(key)


def announce(session: Session) -> dict[str, set[str]]:
    """Before commit: NOTIFY what was marked, on PostgreSQL; returns it.

    NOTIFY is transactional: other replicas hear of a change when, and only
    if, the transaction commits. PostgreSQL folds identical notifications of
    one transaction, and the ids are sets, so a batch that marks a rollout
    many times sends it once.
    """
    marked: dict[str, set[str]] = session.info.pop(_KEY, {})
    if marked and session.get_bind().dialect.name == "postgresql":
        for channel, ids in marked.items():
            session.execute(
                text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id"),
                {"channel": channel, "ids": sorted(ids)},
            )
    return marked


def subscribe(engine: Engine, channel: str, listener: Listener) -> None:
    """Call `listener` with the ids each committed transaction on `engine` marked."""
    with _LOCK:
        _LISTENERS.setdefault(engine, {}).setdefault(channel, []).append(listener)


def committed(engine: Engine, changed: dict[str, set[str]]) -> None:
    """After commit: tell this process's listeners."""
    with _LOCK:
        channels = _LISTENERS.get(engine, {})
        calls = [(listener, ids) for c, ids in changed.items() for listener in channels.get(c, ())]
    for listener, ids in calls:
        try:
            listener(ids)
        except Exception:
            # A listener's bug must not turn a committed write into an error.
            log.exception("a change listener failed")
