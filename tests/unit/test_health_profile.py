"""The simulator's crash probabilities: per model and per feature version."""

from __future__ import annotations

import pytest

from device_sim.profile import HealthProfile
from ota.errors import InvalidArgument


def test_the_most_specific_rule_wins() -> None:
    profile = HealthProfile.parse(["*@2.0.0=1.0", "ev9=0.5", "ev9@1.0.0=0.25", "niro@*=0.1"])
    assert profile.crash_rate("ev6", "2.0.0") == 1.0
    assert profile.crash_rate("ev6", "1.0.0") == 0.0  # the baseline does not crash
    assert profile.crash_rate("ev6", "") == 0.0  # a device running no feature
    assert profile.crash_rate("ev9", "1.0.0") == 0.25
    assert profile.crash_rate("ev9", "2.0.0") == 0.5  # model beats any-model
    assert profile.crash_rate("niro", "") == 0.1


def test_per_model_rates_merge_under_version_rules() -> None:
    merged = HealthProfile.per_model({"ev9": 1.0}).merged(HealthProfile.parse(["ev9@1.0.0=0"]))
    assert merged.crash_rate("ev9", "2.0.0") == 1.0
    assert merged.crash_rate("ev9", "1.0.0") == 0.0


@pytest.mark.parametrize("spec", ["ev9", "ev9=2", "=0.5", "ev9@1.0=x"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        HealthProfile.parse([spec])
    assert e.value.field == "crash"
