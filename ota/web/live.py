"""Live rollout pages: one watcher per rollout, fanning its updates out to every viewer.

A watcher runs while at least one browser follows the rollout. Every
`interval` seconds it reads a fingerprint of the rollout -- its revision and
the count and sum of its aggregate rows, one indexed query -- and only when
that changed (or every `refresh` seconds, for figures such as "offline" that
no aggregate records) builds the report once and renders it once. Each viewer
gets the newest rendering through a one-slot queue: a slow browser skips
intermediate versions instead of piling them up. So N viewers of a rollout cost
one query per interval and one report per change, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sqlalchemy import Table, func

from ota.store.models import AdoptionStatRow, RolloutRow
from ota.store.session import Store

log = logging.getLogger(__name__)

Fingerprint = tuple[object, ...]


def fingerprint(store: Store, rollout_id: str) -> Fingerprint:
    """Changes whenever anything a report shows of the rollout may have changed."""
    table: Table = AdoptionStatRow.__table__  # type: ignore[attr-defined]
    with store.transaction() as session:
        row = session.get(RolloutRow, rollout_id)
        count, total = session.execute(
            table.select()
            .with_only_columns(func.count(), func.sum(table.c.value))
            .where(table.c.rollout_id == rollout_id)
        ).one()
        if row is None:
            return (None,)
        return (row.revision, row.state, row.current_stage, count, total)


@dataclass
class _Watcher:
    rollout_id: str
    viewers: set[asyncio.Queue[str]] = field(default_factory=set)
    latest: str = ""
    task: asyncio.Task[None] | None = None


class LiveReports:
    """The watchers of the rollouts someone is looking at (on the dashboard's event loop)."""

    def __init__(
        self,
        store: Store,
        render: Callable[[str], str],
        *,
        interval: float = 1.0,
        refresh: float = 10.0,
        read_fingerprint: Callable[[str], Fingerprint] | None = None,
    ) -> None:
        self._fingerprint = read_fingerprint or (lambda rid: fingerprint(store, rid))
        self._render = render  # rollout id -> the report's HTML fragment
        self._interval = interval
        self._refresh = refresh
        self._watchers: dict[str, _Watcher] = {}
        # What the watchers did, for the metrics and the benchmark.
        self.checks = 0
        self.renders = 0

    @property
    def watching(self) -> int:
        return len(self._watchers)

    @contextlib.contextmanager
    def follow(self, rollout_id: str) -> Iterator[asyncio.Queue[str]]:
        """A queue of the rollout's report, re-rendered each time it changes.

        Only renderings newer than the page the viewer has are put in it; it holds
        one at most (the newest). Leaving the block stops following, and the last
        viewer to leave stops the rollout's watcher.
        """
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        watcher = self._watchers.get(rollout_id)
        if watcher is None:
            watcher = self._watchers[rollout_id] = _Watcher(rollout_id)
            watcher.task = asyncio.create_task(self._watch(watcher))
        watcher.viewers.add(queue)
        try:
            yield queue
        finally:
            watcher.viewers.discard(queue)
            if not watcher.viewers and self._watchers.get(rollout_id) is watcher:
                del self._watchers[rollout_id]
                if watcher.task is not None:
                    watcher.task.cancel()

    async def _watch(self, watcher: _Watcher) -> None:
        last: Fingerprint | None = None
        built = time.monotonic()
        while watcher.viewers:
            try:
                now_print = await asyncio.to_thread(self._fingerprint, watcher.rollout_id)
                self.checks += 1
                # The first check renders too: the rollout may have moved between the
                # page's rendering and this watcher's start.
                if last is None or now_print != last or time.monotonic() - built >= self._refresh:
                    last = now_print
                    built = time.monotonic()
                    html = await asyncio.to_thread(self._render, watcher.rollout_id)
                    self.renders += 1
                    if html != watcher.latest:
                        watcher.latest = html
                        for queue in list(watcher.viewers):
                            _offer(queue, html)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("live report of rollout %s", watcher.rollout_id)
            await asyncio.sleep(self._interval)


def _offer(queue: asyncio.Queue[str], item: str) -> None:
    """Put the newest item, dropping an older one the viewer has not taken yet."""
    with contextlib.suppress(asyncio.QueueEmpty):
        if queue.full():
            queue.get_nowait()
    queue.put_nowait(item)
