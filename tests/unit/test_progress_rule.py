"""The device progress rule (`ota.domain.progress`): what an event does to a device's standing."""

from __future__ import annotations

import grpc
import pytest

from ota.device.retry import Unreachable
from ota.device.source import _translated
from ota.domain.compatibility import Compatibility
from ota.domain.progress import Standing, advance, counted_failure


def test_steps_move_the_state_forward() -> None:
    s = advance(Standing("TARGETED"), "NOTIFIED")
    s = advance(s, "DOWNLOADING")
    assert s == Standing("DOWNLOADING")


def test_a_failure_counts_and_its_reason_outlives_a_revert() -> None:
    s = advance(Standing("DOWNLOADING"), "FAILED", "HASH_MISMATCH")
    assert s == Standing("FAILED", "HASH_MISMATCH") and s.failure == "HASH_MISMATCH"
    s = advance(s, "ROLLED_BACK")
    assert s == Standing("ROLLED_BACK", "HASH_MISMATCH")


def test_a_refusal_after_settling_is_a_reason_not_a_lost_install() -> None:
    s = advance(Standing("ACTIVE"), "FAILED", "ROLLBACK_REFUSED")
    assert s == Standing("ACTIVE", "ROLLBACK_REFUSED")


def test_giving_up_on_the_control_plane_is_a_wait_not_a_failure() -> None:
    s = advance(Standing("DOWNLOADING"), "FAILED", "CONTROL_PLANE_UNREACHABLE")
    assert s.state == "DOWNLOADING"  # not finished: no gate counts it, the rollout waits
    assert s.waiting and s.failure == ""
    s = advance(s, "DOWNLOADED")
    assert s == Standing("DOWNLOADED")  # the wait is over and leaves nothing behind


def test_a_wait_never_hides_a_real_failure() -> None:
    s = advance(Standing("FAILED", "INSTALL_FAILED"), "FAILED", "CONTROL_PLANE_UNREACHABLE")
    assert s == Standing("FAILED", "INSTALL_FAILED")
    assert counted_failure("CONTROL_PLANE_UNREACHABLE") == ""
    assert counted_failure("DOWNLOAD_FAILED") == "DOWNLOAD_FAILED"


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "test"


@pytest.mark.parametrize(
    ("code", "answered", "meaning"),
    [
        (grpc.StatusCode.UNAVAILABLE, False, "unreachable"),
        (grpc.StatusCode.UNAVAILABLE, True, "unreachable"),  # the server died mid-stream
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, "unreachable"),  # nobody answered
        (grpc.StatusCode.DEADLINE_EXCEEDED, True, "broken"),  # bytes trickled: too slow
        (grpc.StatusCode.INTERNAL, False, "broken"),
        (grpc.StatusCode.NOT_FOUND, False, "final"),
        (grpc.StatusCode.PERMISSION_DENIED, False, "final"),
    ],
)
def test_grpc_answers_are_translated_for_the_retry_policy(
    code: grpc.StatusCode, answered: bool, meaning: str
) -> None:
    exc = _RpcError(code)
    out = _translated(exc, answered=answered)
    if meaning == "unreachable":
        assert isinstance(out, Unreachable)
    elif meaning == "broken":
        assert out is exc
    else:
        assert getattr(out, "status_code", None) is not None


# -- compatibility: one rule, for exposure, health attribution and the SQL queries ---------


def test_compatibility_is_the_signed_models_and_firmware_floor() -> None:
    c = Compatibility.of(["ev6", "ev9"], "4.1")
    assert c.admits("ev6", "4.1.0") and c.admits("ev9", "5")
    assert not c.admits("niro", "4.2")  # a model the bundle was not built for
    assert not c.admits("ev6", "4.0.9")  # below the floor
    assert not c.admits("ev6", "beta")  # unparsable firmware is below every floor
    anything = Compatibility.of([], None)
    assert anything.admits("niro", "beta")


def test_finished_counts_failures_and_installs_but_not_waits() -> None:
    from ota.domain.progress import applies, failed, finished, furthest_rank

    counts = {"ACTIVE": 3, "INSTALLED": 1, "FAILED": 2, "DOWNLOADING": 4}
    assert (failed(counts), finished(counts)) == (2, 6)
    assert applies(5, 4) and not applies(4, 4) and not applies(3, 4)
    assert furthest_rank(2, "ACTIVE") == 7 and furthest_rank(5, "FAILED") == 5
