"""Event numbers that keep increasing across restarts and power cuts.

Ingest is idempotent on ``(device_id, seq)``: a device that reused a number
after a reboot would have its new event dropped as a duplicate. The file
holds a high-water mark reserved ahead of use, replaced atomically, so it is
written at boot and then once per `EventSequence.BLOCK` events; a restart
skips the unused rest of the block.
"""

from __future__ import annotations

from pathlib import Path

from ota.device.trust import write_atomically
from ota.errors import FailedPrecondition


class EventSequence:
    """`next()` gives 1, 2, 3, ... and never a number it gave before, on this disk."""

    BLOCK = 1000

    def __init__(self, path: Path | None, *, durable: bool = True) -> None:
        self._path = path
        self._durable = durable
        self._reserved = 0
        if path is not None and path.exists():
            try:
                self._reserved = int(path.read_text())
            except ValueError as exc:
                # Starting again from 1 would lose events as duplicates: refuse.
                raise FailedPrecondition(f"event sequence {path} is unreadable: {exc}") from exc
        self._last = self._reserved
        # Reserve the first block at boot rather than with the first event: the event
        # a desired state triggers (NOTIFIED) then costs no file write.
        self._reserve()

    def next(self) -> int:
        self._last += 1
        if self._last > self._reserved:
            self._reserve()
        return self._last

    def _reserve(self) -> None:
        self._reserved = self._last + self.BLOCK
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(self._path, str(self._reserved).encode(), durable=self._durable)
