"""Named happenings of the control plane, so the loops that care wake at once.

A part that commits something raises its signal with a plain call; the
workers listening are woken. Nothing is queued and nothing is lost by
coalescing: a signal only says "look again", and a worker's step reads what
is committed. A signal raised by a source outside this process (another
replica, a database notification) is raised the same way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Signal:
    """One named happening: listeners are called on every `emit`, waiters see a new count."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._listeners: list[Callable[[], None]] = []
        self._changed = threading.Condition()
        self._count = 0

    def connect(self, listener: Callable[[], None]) -> None:
        """Call `listener` on each emit, on the emitter's thread: it must not block (a wake)."""
        with self._changed:
            self._listeners.append(listener)

    def emit(self) -> None:
        with self._changed:
            self._count += 1
            listeners = list(self._listeners)
            self._changed.notify_all()
        for listener in listeners:
            try:
                listener()
            except Exception:
                # A listener's bug must not fail the commit that raised the signal.
                log.exception("a listener of %r failed", self.name)

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def wait(self, seen: int, timeout: float) -> int:
        """Wait until emitted since `seen` (a count this returned before), or `timeout`."""
        with self._changed:
            self._changed.wait_for(lambda: self._count != seen, timeout)
            return self._count


class Signals:
    """The domain signals of one control plane process."""

    def __init__(self) -> None:
        # Desired states were committed to the outbox: the publisher sends them.
        self.desired_committed = Signal("desired committed")
        # A rollout's row changed (a command, the engine, another replica's notice).
        self.rollout_changed = Signal("rollout changed")
        # Ingest committed events that moved some device's progress in a rollout.
        self.progress_ingested = Signal("progress ingested")
        # This replica took, or lost, the engine lease.
        self.lease_gained = Signal("lease gained")
        self.lease_lost = Signal("lease lost")
