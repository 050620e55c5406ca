"""A worker: one thread running a step when signalled, or at the latest every interval.

Every long-running loop of the control plane has the same needs: start,
stop and join; run now when something it cares about happened; run anyway
after a while for what nobody signals (time passing, another replica's
writes); log a failed step once, in one shape, and wait longer after each
failure in a row so a database outage is not hammered; and do nothing while
it may not (a replica without the engine lease).

A step returns how many seconds until it wants to run again: 0 for "more
work now", None for "when signalled, or after the interval". A signal
raised while the step runs makes it run once more, so nothing committed
meanwhile waits for the interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ota.errors import OtaError
from ota.runtime.signals import Signal

log = logging.getLogger(__name__)

Step = Callable[[], float | None]


class Backoff:
    """How long a failing step waits: doubling from `first` up to `most`, reset by a success."""

    def __init__(self, first: float = 0.25, most: float = 5.0) -> None:
        if not 0 < first <= most:
            raise ValueError(f"backoff needs 0 < first <= most, got {first} and {most}")
        self._first = first
        self._most = most
        self._next = first
        self.failures = 0  # in a row

    def failed(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._most)
        self.failures += 1
        return delay

    def succeeded(self) -> None:
        self._next = self._first
        self.failures = 0


@dataclass(frozen=True)
class Pause:
    """What a worker does after one run: wait this long, and whether a signal cuts it short."""

    seconds: float
    wakeable: bool = True


class Worker:
    """Runs `step` on its own thread: on `wake`, on a listened signal, or after `interval`."""

    def __init__(
        self,
        name: str,
        step: Step,
        *,
        interval: float,
        wake_on: Iterable[Signal] = (),
        coalesce_on: Iterable[Signal] = (),
        active: Callable[[], bool] | None = None,
        min_gap: float = 0.0,
        backoff: Backoff | None = None,
        join_seconds: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"a worker's interval must be positive, got {interval}")
        self.name = name
        self._step = step
        self._interval = interval
        # While `active` says no (no lease), the step is skipped; a signal or the
        # interval asks again.
        self._active = active
        # `coalesce_on` signals closer than `min_gap` to the last run wait for the
        # rest of it, so a busy fleet's ingest is not a step per batch; `wake_on`
        # signals (an operator's command) run the step at once.
        self._min_gap = min_gap
        self._urgent = False
        self._backoff = backoff or Backoff()
        self._join = join_seconds
        self._monotonic = monotonic
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ota-{name}", daemon=True)
        self._last_run = float("-inf")
        self.runs = 0  # steps that returned normally
        for signal in wake_on:
            signal.connect(self.wake)
        for signal in coalesce_on:
            signal.connect(self._wake.set)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._urgent = True
        self._wake.set()

    def stop(self) -> None:
        """Ask the loop to end and wait for the step in progress (at most `join_seconds`)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._join)
            if self._thread.is_alive():
                log.warning("%s did not stop within %.0fs", self.name, self._join)

    @property
    def stopping(self) -> bool:
        """True once stop was asked: a long step checks it between its parts."""
        return self._stop.is_set()

    def sleep(self, seconds: float) -> bool:
        """Wait inside a step, ending early on stop; True if stopping."""
        return self._stop.wait(seconds)

    def run_once(self) -> Pause:
        """Run the step once (if active) and say how to wait before the next run."""
        if self._active is not None and not self._active():
            return Pause(self._interval)
        self._last_run = self._monotonic()
        try:
            due = self._step()
        except OtaError as exc:
            delay = self._backoff.failed()
            log.warning("%s deferred, retrying in %.2gs: %s", self.name, delay, exc)
            return Pause(delay, wakeable=False)
        except Exception:
            # A bug must not silently end the loop: it retries, ever more slowly.
            delay = self._backoff.failed()
            log.exception("%s failed unexpectedly; retrying in %.2gs", self.name, delay)
            return Pause(delay, wakeable=False)
        self._backoff.succeeded()
        self.runs += 1
        if due is None:
            return Pause(self._interval)
        return Pause(min(max(due, 0.0), self._interval))

    def gap_left(self) -> float:
        """How long a signal must still wait for `min_gap` after the last run."""
        return max(0.0, self._last_run + self._min_gap - self._monotonic())

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the step: a signal raised during it runs the step again.
            self._wake.clear()
            self._urgent = False
            pause = self.run_once()
            if pause.seconds <= 0:
                continue
            if not pause.wakeable:
                self._stop.wait(pause.seconds)
                continue
            if self._wake.wait(pause.seconds) and not self._urgent:
                gap = self.gap_left()
                if gap > 0:
                    self._stop.wait(gap)
