"""Duration histograms: buckets bound their durations tightly; percentiles read them back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ota.domain.durations import bucket_upper_seconds, duration_bucket, percentile_seconds


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
