"""Durations and times as histogram buckets: what ingest counts and reports read; and
durations as people write them (`30d`).

Durations fall in logarithmic buckets (four per doubling, so a bucket's upper
bound is at most 19 % above any duration in it); times fall in fixed-width
buckets. Both are integers, so aggregates can be summed by key in SQL.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime

from ota.errors import InvalidArgument

PER_DOUBLING = 4
TIME_BUCKET_SECONDS = 60


def duration_bucket(seconds: float) -> int:
    """The bucket of a duration; durations under 10 ms share bucket 0."""
    ms = max(seconds, 0.0) * 1000.0
    if ms < 10.0:
        return 0
    return max(1, math.floor(math.log2(ms / 10.0) * PER_DOUBLING) + 1)


def bucket_upper_seconds(bucket: int) -> float:
    """The largest duration in a bucket (the value a percentile reports)."""
    return float(0.01 * 2.0 ** (bucket / PER_DOUBLING))


def percentile_seconds(histogram: Mapping[int, int], fraction: float) -> float:
    """The duration below which `fraction` of the counted devices fall (bucket upper bound)."""
    total = sum(histogram.values())
    if total <= 0:
        return 0.0
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_upper_seconds(bucket)
    return bucket_upper_seconds(max(histogram))


def time_bucket(when: datetime) -> int:
    """Epoch seconds of the start of `when`'s time bucket."""
    epoch = int(when.replace(tzinfo=when.tzinfo or UTC).timestamp())
    return epoch - epoch % TIME_BUCKET_SECONDS


def bucket_time(bucket: int) -> datetime:
    return datetime.fromtimestamp(bucket, UTC)


# Twelve digits bound the number before it is multiplied; a duration is at most a
# century in any case, so it always fits a timedelta and a database interval.
_DURATION = re.compile(r"^\s*(\d{1,12})\s*(s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, None: 1}
MAX_ANY_DURATION_SECONDS = 36_500 * 86_400
# The examples an error gives: soaks and windows run minutes to hours; look-backs and
# lifetimes run hours to days.
SOAK_LIKE = "30s, 15m, 2h or 1d"
DAYS_LIKE = "30d, 12h or 15m"


def parse_duration(
    value: object,
    *,
    field: str,
    at_most: int = MAX_ANY_DURATION_SECONDS,
    like: str = SOAK_LIKE,
) -> int:
    """Seconds in a duration as people write it: `90` (seconds), `30s`, `15m`, `2h`,
    `30d` or `2w`; a plan document's whole number counts as seconds too.

    `like` is the examples the error gives, chosen for the field's usual scale; a value
    over `at_most` is refused with the bound in whole days (or seconds under a day).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        seconds = value
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is None:
            raise InvalidArgument(f"give a duration like {like}, got {value!r}", field=field)
        seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > at_most:
        bound = f"{at_most // 86_400}d" if at_most % 86_400 == 0 else f"{at_most}s"
        raise InvalidArgument(f"must be at most {bound}, got {str(value).strip()}", field=field)
    return seconds
