"""Keeps the image repository's timestamp (and snapshot) from expiring."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from ota.errors import OtaError
from ota.trust.repository import ImageRepository

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
    ) -> None:
        # Among replicas only the engine lease's holder re-signs, once.
        self._holds_lease = holds_lease
        self._repo = repository
        self._every = every.total_seconds()
        self._min_remaining = min_remaining
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ota-timestamp", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                if (
                    self._holds_lease is None or self._holds_lease()
                ) and self._repo.refresh_timestamp(min_remaining=self._min_remaining):
                    log.info("re-signed the timestamp")
            except OtaError as exc:
                log.warning("could not re-sign the timestamp, will retry: %s", exc)
            except Exception:
                log.exception("re-signing the timestamp failed unexpectedly; will retry")
            if self._stop.wait(self._every):
                return
