"""What a transaction changed is told after it commits, here and to other replicas; never after a rollback."""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection

import pytest

from ota.store import changes
from ota.store.database import migrate, open_database
from ota.store.notices import ChangeNotices
from ota.store.session import Store

pytestmark = pytest.mark.integration


def test_changes_are_told_after_commit_and_never_after_a_rollback(database_url: str) -> None:
    engine = open_database(database_url)
    migrate(engine)
    store = Store(engine)
    heard: list[set[str]] = []

    def here(ids: Collection[str]) -> None:
        heard.append(set(ids))

    changes.subscribe(engine, changes.ROLLOUTS, here)
    elsewhere: queue.Queue[tuple[str, str]] = queue.Queue()
    listening = threading.Event()
    notices: ChangeNotices | None = None
    if engine.dialect.name == "postgresql":
        # Another replica's listener: its own engine on the same database.
        other = open_database(database_url)
        notices = ChangeNotices(
            other,
            lambda channel, key: elsewhere.put((channel, key)),
            lambda up: listening.set() if up else listening.clear(),
        )
        notices.start()
        assert listening.wait(30), "the listener never listened"
    try:
        with pytest.raises(RuntimeError), store.transaction() as session:
            changes.rollout_changed(session, "r-rolled-back")
            raise RuntimeError("the transaction fails")
        with store.transaction() as session:
            changes.rollout_changed(session, "r-1")
            changes.rollout_changed(session, "r-1")
            changes.token_revoked(session, "t-1")
        assert heard == [{"r-1"}]
        if notices is not None:
            got = {elsewhere.get(timeout=30), elsewhere.get(timeout=30)}
            assert got == {(changes.ROLLOUTS, "r-1"), (changes.TOKENS, "t-1")}
            # Notices arrive in commit order: a rolled-back one would have come first.
            assert elsewhere.empty()
    finally:
        if notices is not None:
            notices.stop()
            other.dispose()
        engine.dispose()
