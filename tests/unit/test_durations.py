"""Duration histograms: buckets bound their durations tightly; percentiles read them back.
Durations as people write them: one rule for plans and flags."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ota.domain.durations import (
    DAYS_LIKE,
    bucket_upper_seconds,
    duration_bucket,
    parse_duration,
    percentile_seconds,
)
from ota.errors import InvalidArgument


@given(st.floats(min_value=0.0, max_value=30 * 86_400.0))
def test_a_duration_is_at_most_its_bucket_bound_and_not_far_below(seconds: float) -> None:
    upper = bucket_upper_seconds(duration_bucket(seconds))
    assert seconds <= upper * (1 + 1e-9)
    assert seconds < 0.01 or upper <= seconds * 2 ** (1 / 4) * (1 + 1e-9)


def test_percentiles_come_from_the_cumulative_counts() -> None:
    histogram = {duration_bucket(1.0): 50, duration_bucket(10.0): 40, duration_bucket(100.0): 10}
    assert percentile_seconds(histogram, 0.5) == bucket_upper_seconds(duration_bucket(1.0))
    assert percentile_seconds(histogram, 0.9) == bucket_upper_seconds(duration_bucket(10.0))
    assert percentile_seconds(histogram, 0.99) == bucket_upper_seconds(duration_bucket(100.0))
    assert percentile_seconds({}, 0.5) == 0.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30),
        (" 15 m ", 900),
        ("2h", 7200),
        ("30d", 2_592_000),
        ("2w", 1_209_600),
        ("90", 90),
        (90, 90),
        (0, 0),
    ],
)
def test_durations_read_as_people_write_them(value: object, seconds: int) -> None:
    assert parse_duration(value, field="soak") == seconds


@pytest.mark.parametrize("value", ["30 minutes", "1.5h", "-5s", "", "1y", True, -5, 1.5, None])
def test_a_duration_that_is_not_one_names_its_field_and_the_examples(value: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_duration(value, field="--since", like=DAYS_LIKE)
    assert caught.value.field == "--since"
    assert caught.value.message == f"give a duration like 30d, 12h or 15m, got {value!r}"


def test_a_duration_over_its_bound_is_refused_with_the_bound() -> None:
    year = 365 * 86_400
    assert parse_duration("365d", field="window", at_most=year) == year
    with pytest.raises(InvalidArgument, match=r"must be at most 365d, got 400d"):
        parse_duration(" 400d", field="window", at_most=year)
    with pytest.raises(InvalidArgument, match=r"must be at most 36500d"):
        parse_duration("999999999999w", field="--expires-in")
