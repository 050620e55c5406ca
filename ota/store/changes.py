"""Which rollouts a transaction changed, told once it commits: here and to other replicas.

Every writer of a rollout's row or of its progress rows marks the rollout in
its transaction (`rollout_changed`). When the transaction commits, this
process's listeners hear of it (`subscribe`); on PostgreSQL the transaction
also ran `pg_notify(CHANNEL, rollout_id)` just before its commit, so every
replica listening on `CHANNEL` hears of it too, and only if it committed.
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

# The NOTIFY channel; the payload is one rollout id.
CHANNEL = "ota_rollout"
_KEY = "ota.rollouts_changed"

Listener = Callable[[Collection[str]], None]
_LISTENERS: weakref.WeakKeyDictionary[Engine, list[Listener]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def rollout_changed(session: Session, rollout_id: str) -> None:
    """Mark a rollout changed by this transaction (its row, or its progress)."""
    marked: set[str] = session.info.setdefault(_KEY, set())
    marked.add(rollout_id)


def announce(session: Session) -> set[str]:
    """Before commit: NOTIFY the marked rollouts on PostgreSQL; returns them.

    NOTIFY is transactional: other replicas hear of a change when, and only
    if, the transaction commits. PostgreSQL folds identical notifications of
    one transaction, so a batch that marks a rollout many times sends it once.
    """
    marked: set[str] = session.info.pop(_KEY, set())
    if marked and session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, id) FROM unnest(CAST(:ids AS text[])) AS id"),
            {"channel": CHANNEL, "ids": sorted(marked)},
        )
    return marked


def subscribe(engine: Engine, listener: Listener) -> None:
    """Call `listener` with the rollouts each committed transaction on `engine` changed."""
    with _LOCK:
        _LISTENERS.setdefault(engine, []).append(listener)


def unsubscribe(engine: Engine, listener: Listener) -> None:
    with _LOCK:
        listeners = _LISTENERS.get(engine, [])
        if listener in listeners:
            listeners.remove(listener)


def committed(engine: Engine, rollout_ids: Collection[str]) -> None:
    """After commit: tell this process's listeners."""
    with _LOCK:
        listeners = list(_LISTENERS.get(engine, ()))
    for listener in listeners:
        try:
            listener(rollout_ids)
        except Exception:
            # A listener's bug must not turn a committed write into an error.
            log.exception("a rollout change listener failed")
