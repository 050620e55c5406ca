"""Per-device rate limits on ingest: one device flooding cannot crowd out the fleet.

Each device id has a token bucket: `burst` messages at once, refilled at `rate`
per second. A message over the limit is acknowledged and dropped (counted as
``rate_limited``), the device is flagged for `flag_seconds` after its last drop,
and a WARNING names it at most once per `log_interval` seconds, so the log
does not flood along with the device.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ota.errors import InvalidArgument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceRateLimit:
    """Messages per second one device may send, sustained and in a burst; rate 0 = no limit."""

    rate: float = 20.0
    burst: int = 1000
    flag_seconds: float = 300.0
    log_interval: float = 60.0

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise InvalidArgument("must not be negative", field="ingest_device_rate")
        if self.rate > 0 and self.burst < 1:
            raise InvalidArgument("must be at least 1", field="ingest_device_burst")


@dataclass(frozen=True)
class FloodReport:
    """What an operator sees about a device that is being rate limited."""

    device_id: str
    dropped: int
    last_dropped_seconds_ago: float


@dataclass
class _Bucket:
    tokens: float
    updated: float
    dropped: int = 0
    last_drop: float = 0.0
    unlogged: int = 0
    logged_at: float = float("-inf")


class DeviceRateLimiter:
    """Token buckets by device id; thread-safe (the ingester admits, the API reads flags)."""

    def __init__(
        self, limit: DeviceRateLimit, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._now = monotonic
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._admitted_since_prune = 0

    @property
    def limit(self) -> DeviceRateLimit:
        return self._limit

    def admit(self, device_id: str) -> bool:
        """Take one token for `device_id`; False means drop the message."""
        if self._limit.rate <= 0:
            return True
        now = self._now()
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None:
                bucket = self._buckets[device_id] = _Bucket(float(self._limit.burst), now)
                self._prune_sometimes(now)
            else:
                elapsed = max(now - bucket.updated, 0.0)
                bucket.tokens = min(self._limit.burst, bucket.tokens + elapsed * self._limit.rate)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return True
            bucket.dropped += 1
            bucket.unlogged += 1
            bucket.last_drop = now
            if now - bucket.logged_at >= self._limit.log_interval:
                log.warning(
                    "device %s exceeds %g messages/s (burst %d): dropped %d messages, "
                    "%d in total; its messages are dropped until it slows down",
                    device_id,
                    self._limit.rate,
                    self._limit.burst,
                    bucket.unlogged,
                    bucket.dropped,
                )
                bucket.logged_at = now
                bucket.unlogged = 0
            return False

    def admit_many(self, device_ids: Sequence[str]) -> list[bool]:
        """`admit` for each message of a batch, in order (what ingest workers ask for)."""
        return [self.admit(device_id) for device_id in device_ids]

    def flagged(self, device_id: str) -> FloodReport | None:
        """The device's drops if it was rate limited within the last `flag_seconds`."""
        now = self._now()
        with self._lock:
            bucket = self._buckets.get(device_id)
            if bucket is None or not bucket.dropped:
                return None
            ago = now - bucket.last_drop
            if ago > self._limit.flag_seconds:
                return None
            return FloodReport(device_id, bucket.dropped, ago)

    def dropped_if_flagged(self, device_id: str) -> int | None:
        """Messages dropped from a flagged device (None while it is not flagged)."""
        report = self.flagged(device_id)
        return report.dropped if report else None

    def _prune_sometimes(self, now: float) -> None:
        # A bucket that has refilled and carries no recent flag is the same as no
        # bucket: forget it, so memory follows the devices that are active.
        self._admitted_since_prune += 1
        if self._admitted_since_prune < 10_000:
            return
        self._admitted_since_prune = 0
        full_after = self._limit.burst / self._limit.rate
        keep_flag = self._limit.flag_seconds
        stale = [
            device_id
            for device_id, b in self._buckets.items()
            if now - b.updated >= full_after and (not b.dropped or now - b.last_drop > keep_flag)
        ]
        for device_id in stale:
            del self._buckets[device_id]
