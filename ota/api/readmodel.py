"""GetRollout from memory: each rollout's full message, kept until something changes it.

An entry is dropped when a committed transaction changed the rollout's row
or its progress (`ota.store.changes`: commands, engine decisions, ingest
batches), in this process at once and, on PostgreSQL, in every other replica
when its NOTIFY arrives (`ota.api.freshness`). What no writer announces
(the fleet a draft's eligible count is taken over, the holdout count) is
bounded by `max_age` instead: no entry is served older than that.

Stale data must not outlive an invalidation that raced a load: each entry is
stored only if no invalidation of it (or of everything) happened since its
load began, so a message read before a change committed is never kept after
the change was announced. While the cache cannot hear other replicas (its
listen connection is down), it is off: every call reads the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection

from ota.v1 import rollout_pb2

Load = Callable[[str], rollout_pb2.Rollout]
# Entries are a few KiB; past this many, the expired ones are dropped first.
MAX_ENTRIES = 4096


class RolloutReadModel:
    """Rollout messages by id, each at most `max_age` seconds old, dropped on change."""

    def __init__(
        self,
        load: Load,
        *,
        max_age: float,
        live: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        # rollout id -> (message, monotonic time it was loaded)
        self._entries: dict[str, tuple[rollout_pb2.Rollout, float]] = {}
        # Bumped by every invalidation of the id; `_epoch` by every invalidate_all.
        self._generations: dict[str, int] = {}
        self._epoch = 0
        self._live = live

    def get(self, rollout_id: str) -> rollout_pb2.Rollout:
        """The rollout's message; the caller must not modify it (it is shared)."""
        now = self._clock()
        entry = self._entries.get(rollout_id)
        if entry is not None and now - entry[1] < self._max_age:
            return entry[0]
        with self._lock:
            seen = (self._epoch, self._generations.get(rollout_id, 0))
            live = self._live
        message = self._load(rollout_id)  # NotFound (missing, deleted) is not kept
        if live:
            with self._lock:
                if (self._epoch, self._generations.get(rollout_id, 0)) == seen and self._live:
                    if len(self._entries) >= MAX_ENTRIES:
                        self._prune(now)
                    self._entries[rollout_id] = (message, now)
        return message

    def _prune(self, now: float) -> None:
        """Under the lock: drop expired entries, and everything if that was not enough."""
        self._entries = {k: e for k, e in self._entries.items() if now - e[1] < self._max_age}
        if len(self._entries) >= MAX_ENTRIES:
            self._entries = {}
        # Generations of ids no longer kept only matter to loads in flight.
        self._generations.clear()
        self._epoch += 1

    def invalidate(self, rollout_id: str) -> None:
        """Drop one rollout: its row or its progress changed."""
        self.invalidate_many((rollout_id,))

    def invalidate_many(self, rollout_ids: Collection[str]) -> None:
        with self._lock:
            for rollout_id in rollout_ids:
                self._entries.pop(rollout_id, None)
                self._generations[rollout_id] = self._generations.get(rollout_id, 0) + 1
            if len(self._generations) > 4 * MAX_ENTRIES:
                # Every rollout ever changed: start the count afresh (loads in flight
                # see the epoch move and keep nothing).
                self._generations.clear()
                self._epoch += 1

    def invalidate_all(self) -> None:
        """Drop everything: changes may have been missed."""
        with self._lock:
            self._entries.clear()
            # Generations only need to differ from what a load in flight saw.
            self._generations.clear()
            self._epoch += 1

    def set_live(self, live: bool) -> None:
        """Whether changes elsewhere reach this cache; while not, nothing is kept.

        Either way everything is dropped: going down, what was kept can no
        longer be invalidated; coming up, what was announced meanwhile was missed.
        """
        with self._lock:
            self._live = live
            self._entries.clear()
            self._generations.clear()
            self._epoch += 1

    @property
    def live(self) -> bool:
        return self._live
