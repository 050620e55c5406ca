"""The engine skips re-reading a rollout whose last full pass exposed nobody, within limits."""

from __future__ import annotations

from ota.rollout.exposure import QuietRollouts


def test_a_quiet_rollout_is_skipped_until_its_stage_or_eligible_count_changes() -> None:
    quiet = QuietRollouts(rescan_seconds=3600)
    assert not quiet.may_skip("r1", 0, 100)  # never scanned
    quiet.record("r1", 0, 100, exposed=0)
    assert quiet.may_skip("r1", 0, 100)
    assert not quiet.may_skip("r1", 1, 100)  # the stage advanced
    assert not quiet.may_skip("r1", 0, 101)  # a device registered
    assert not quiet.may_skip("r2", 0, 100)


def test_a_pass_that_exposed_devices_is_not_quiet_and_quiet_expires() -> None:
    quiet = QuietRollouts(rescan_seconds=3600)
    quiet.record("r1", 0, 100, exposed=5)
    assert not quiet.may_skip("r1", 0, 100)
    expired = QuietRollouts(rescan_seconds=0)
    expired.record("r1", 0, 100, exposed=0)
    assert not expired.may_skip("r1", 0, 100)
