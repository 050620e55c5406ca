"""Keeps the image repository's timestamp (and snapshot) from expiring."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from ota.runtime import Worker
from ota.trust.repository import ImageRepository, MetadataStore

log = logging.getLogger(__name__)


class TimestampRefresher:
    """Re-signs the timestamp on a schedule, long before devices would see it expire."""

    def __init__(
        self,
        repository: ImageRepository,
        *,
        every: timedelta = timedelta(minutes=5),
        min_remaining: timedelta = timedelta(hours=12),
        holds_lease: Callable[[], bool] | None = None,
        fenced: MetadataStore | None = None,
    ) -> None:
        # Among replicas only the engine lease's holder re-signs, once, and writes
        # through the lease's fenced store so a replica that lost it writes nothing.
        self._repo = repository
        self._fenced = fenced
        self._min_remaining = min_remaining
        self._worker = Worker(
            "timestamp", self.refresh, interval=every.total_seconds(), active=holds_lease
        )

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def refresh(self) -> None:
        if self._repo.refresh_timestamp(min_remaining=self._min_remaining, writer=self._fenced):
            log.info("re-signed the timestamp")
