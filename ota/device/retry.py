"""How a device retries the control plane: which faults wait, which are counted, which are final.

Three kinds of fault, told apart by `classify`:

- **unreachable**: the control plane cannot be reached -- connection refused or
  reset, gRPC UNAVAILABLE, no answer before the deadline. A restart or an
  outage looks like this. The device keeps its place (a download resumes from
  its last byte) and retries with jittered, exponentially growing pauses for up
  to `RetryPolicy.unreachable_for` seconds without a word; only then does it
  give up, with `ControlPlaneUnreachable` (reason CONTROL_PLANE_UNREACHABLE,
  which no install-failure gate counts).
- **broken**: the control plane answered but the transfer broke (a stream that
  stalls past its deadline while bytes trickle, an unexpected error). Retried
  the same way, for at most `RetryPolicy.attempts` calls (DOWNLOAD_FAILED).
- **final**: a refusal a retry cannot change (not found, not allowed, more bytes
  than were signed): python-tuf's ``DownloadError``, raised at once.

Sources (`MetadataSource`) say "unreachable" by raising `Unreachable` or any
``ConnectionError``/``TimeoutError``; they know their transport, this module
does not.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from tuf.api import exceptions as tuf_errors

from ota.errors import InvalidArgument

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Unreachable(ConnectionError):
    """The control plane could not be reached: worth waiting for, not a failure."""


class ControlPlaneUnreachable(tuf_errors.DownloadError):
    """The device waited `RetryPolicy.unreachable_for` seconds for the control plane and gave up.

    A ``DownloadError`` so that python-tuf passes it through unchanged (it wraps
    every other exception into a plain "Failed to download").
    """


class Fault(enum.Enum):
    UNREACHABLE = "unreachable"
    BROKEN = "broken"
    FINAL = "final"


def classify(exc: BaseException) -> Fault:
    """What kind of fault `exc` is, for the retry loop."""
    if isinstance(exc, tuf_errors.DownloadError):
        return Fault.FINAL  # a refusal, or a give-up already decided
    if isinstance(exc, ConnectionError | TimeoutError):
        return Fault.UNREACHABLE
    return Fault.BROKEN


@dataclass(frozen=True)
class RetryPolicy:
    """How a device retries the control plane: jittered backoff, bounded in calls and in time.

    After the n-th failed call in a row the device pauses for a time drawn
    uniformly from [d/2, d], where d = min(`max_delay`, `first_delay` * 2**(n-1))
    seconds: pauses grow, and the jitter keeps a fleet that lost its server at the
    same moment from coming back in step. A transfer that broke is given up after
    `attempts` calls (the first included); a control plane that cannot be reached
    is waited for until `unreachable_for` seconds have passed since the last call
    that reached it. `sleep` and `clock` (monotonic seconds) are injectable so
    tests need not wait.
    """

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 30.0
    unreachable_for: float = 600.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidArgument("must be at least 1", field="attempts")
        if not 0 <= self.first_delay <= self.max_delay:
            raise InvalidArgument(
                "delays must satisfy 0 <= first_delay <= max_delay", field="first_delay"
            )
        if not self.unreachable_for >= 0:
            raise InvalidArgument("must be 0 or more seconds", field="unreachable_for")

    def delay(self, failures: int, rng: random.Random) -> float:
        """The pause after `failures` failed calls in a row (failures >= 1)."""
        ceiling = min(self.max_delay, self.first_delay * 2.0 ** min(failures - 1, 62))
        return ceiling * (0.5 + 0.5 * rng.random())

    def tracker(self, what: str, rng: random.Random) -> Retries:
        """A fresh count of failures for one transfer."""
        return Retries(self, what, rng)

    def call(
        self, what: str, fn: Callable[[], T], rng: random.Random, *, permanent: type[Exception]
    ) -> T:
        """Run `fn` until it returns, retrying under this policy; `permanent` errors are raised.

        Gives up with the last error when a broken call used up the attempts, or
        with `ControlPlaneUnreachable` once the control plane was out of reach
        for `unreachable_for` seconds.
        """
        retries = self.tracker(what, rng)
        while True:
            try:
                return fn()
            except permanent:
                raise
            except Exception as exc:
                retries.failed(exc)


class Retries:
    """Failures of one transfer so far: decides, after each, to pause or to give up."""

    def __init__(self, policy: RetryPolicy, what: str, rng: random.Random) -> None:
        self._policy = policy
        self._what = what
        self._rng = rng
        self._broken = 0  # calls that reached the control plane and broke
        self._in_a_row = 0  # failures since the last progress: drives the backoff
        self._unreachable_since: float | None = None

    def progressed(self) -> None:
        """The control plane answered (bytes arrived): a wait for it is over."""
        self._in_a_row = 0
        self._unreachable_since = None

    def failed(self, exc: Exception) -> None:
        """Pause before the next call, or raise: `exc` itself, or `ControlPlaneUnreachable`."""
        fault = classify(exc)
        if fault is Fault.FINAL:
            raise exc
        policy = self._policy
        now = policy.clock()
        if fault is Fault.UNREACHABLE:
            if self._unreachable_since is None:
                self._unreachable_since = now
            waited = now - self._unreachable_since
            if waited >= policy.unreachable_for:
                raise ControlPlaneUnreachable(
                    f"{self._what}: the control plane was unreachable for {waited:.0f}s "
                    f"(last: {exc})"
                ) from exc
        else:
            self._unreachable_since = None  # it answered, if badly
            self._broken += 1
            if self._broken >= policy.attempts:
                raise exc
        self._in_a_row += 1
        pause = policy.delay(self._in_a_row, self._rng)
        if fault is Fault.UNREACHABLE and self._unreachable_since is not None:
            # Never sleep past the window: give up on time, after one last try.
            left = self._unreachable_since + policy.unreachable_for - now
            pause = min(pause, max(left, 0.0))
        logger.info("%s failed (%s: %s); retrying in %.2fs", self._what, fault.value, exc, pause)
        policy.sleep(pause)
