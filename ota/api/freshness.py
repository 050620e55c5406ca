"""What keeps the API's answers from memory current: this process's commits, other replicas'.

Two things are kept in memory: GetRollout's messages (`RolloutReadModel`)
and verified API tokens (`Authenticator`). A commit in this process drops
what it changed at once (`ota.store.changes`). On PostgreSQL, other
replicas' commits arrive as notices on one listening connection
(`ota.store.notices`); while that connection is down nothing is kept, so a
replica never answers from memory what it could not hear about.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine

from ota.api.auth import Authenticator
from ota.api.readmodel import RolloutReadModel
from ota.store import changes
from ota.store.notices import ChangeNotices


def follow_changes(
    engine: Engine,
    views: RolloutReadModel,
    auth: Authenticator,
    *,
    on_rollout_changed: Callable[[], None] = lambda: None,
) -> ChangeNotices | None:
    """The listener to start that tells `views` and `auth` other replicas' changes.

    `on_rollout_changed` hears of each rollout another replica changed, and
    once whenever listening (re)starts, since changes meanwhile went unheard.

    None on SQLite, where one process is all there is (this process's own
    commits reach both through `ota.store.changes.subscribe`). Until the
    listener listens, neither keeps anything.
    """
    if engine.dialect.name != "postgresql":
        return None

    def heard(channel: str, key: str) -> None:
        if channel == changes.ROLLOUTS:
            views.invalidate(key)
            on_rollout_changed()
        elif channel == changes.TOKENS:
            auth.forget_tokens([key])

    def live(up: bool) -> None:
        views.set_live(up)
        auth.set_live(up)
        if up:
            on_rollout_changed()

    live(False)
    return ChangeNotices(engine, heard, live)
