"""The hook runner on real executables: arguments, environment, and every way a hook misbehaves."""

from __future__ import annotations

from pathlib import Path

from ota.agent.config import HookSettings
from ota.agent.hooks import HookCall, Hooks
from ota.agent.runtime import _parse_health
from ota.v1 import common_pb2

CALL = HookCall("nav", "2.0.0", Path("/var/lib/b.bundle"), "ab" * 32, "1.0.0", "r-1")


def hooks_with(tmp_path: Path, script: str, *, mode: int = 0o755, **limits: float) -> Hooks:
    path = tmp_path / "install"
    path.write_text(script)
    path.chmod(mode)
    return Hooks(HookSettings({"install": path}, **limits), {"OTA_DEVICE_ID": "car-1"})  # type: ignore[arg-type]


def test_a_hook_gets_its_arguments_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    hooks = hooks_with(
        tmp_path,
        f'#!/bin/sh\necho "$@|$OTA_HOOK|$OTA_FEATURE|$OTA_VERSION|$OTA_BUNDLE|$OTA_SHA256'
        f'|$OTA_PREVIOUS_VERSION|$OTA_ROLLOUT_ID|$OTA_DEVICE_ID" > {out}\n',
    )
    result = hooks.run("install", CALL)
    assert result.ok, result.detail
    assert out.read_text().strip() == (
        f"nav 2.0.0 /var/lib/b.bundle|install|nav|2.0.0|/var/lib/b.bundle|{'ab' * 32}"
        "|1.0.0|r-1|car-1"
    )


def test_an_unconfigured_hook_has_nothing_to_do() -> None:
    assert Hooks(HookSettings({"install": None}), {}).run("install", CALL).ok


def test_a_non_zero_exit_fails_with_the_tail_of_the_output(tmp_path: Path) -> None:
    result = hooks_with(tmp_path, "#!/bin/sh\necho start\necho 'disk full' >&2\nexit 3\n").run(
        "install", CALL
    )
    assert not result.ok
    assert result.detail == "install hook exited 3: start\ndisk full"


def test_a_hook_killed_by_a_signal_fails(tmp_path: Path) -> None:
    result = hooks_with(tmp_path, "#!/bin/sh\nkill -KILL $$\n").run("install", CALL)
    assert not result.ok and result.reason == "install hook killed by signal SIGKILL"


def test_a_hanging_hook_and_what_it_started_are_killed_at_the_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "child-survived"
    script = f"#!/bin/sh\n(sleep 3; touch {marker}) &\nsleep 60\n"
    result = hooks_with(tmp_path, script, timeout_seconds=0.5).run("install", CALL)
    assert not result.ok and result.reason == "install hook timed out after 0.5s"
    # Its background child was in its process group, and went with it.
    assert not marker.exists()


def test_a_flood_of_output_is_cut_off_and_only_its_tail_kept(tmp_path: Path) -> None:
    script = "#!/bin/sh\nhead -c 10485760 /dev/zero | tr '\\0' x\n"
    result = hooks_with(tmp_path, script, output_limit_bytes=65536).run("install", CALL)
    assert not result.ok
    assert result.reason == "install hook wrote more than 65536 bytes of output"
    assert len(result.output) <= 2048 and len(result.detail) <= 480


def test_a_missing_or_non_executable_hook_fails_without_raising(tmp_path: Path) -> None:
    missing = Hooks(HookSettings({"install": tmp_path / "nope"}), {}).run("install", CALL)
    assert not missing.ok and missing.detail == f"install hook {tmp_path / 'nope'} does not exist"
    plain = hooks_with(tmp_path, "#!/bin/sh\nexit 0\n", mode=0o644).run("install", CALL)
    assert not plain.ok and plain.detail.endswith("is not executable")


def test_a_hook_that_exits_but_leaves_a_helper_holding_its_output_is_not_waited_for(
    tmp_path: Path,
) -> None:
    result = hooks_with(tmp_path, "#!/bin/sh\nsleep 60 &\necho ok\n", timeout_seconds=30).run(
        "install", CALL
    )
    assert result.ok and result.output.strip() == b"ok"


def test_health_reports_are_read_strictly() -> None:
    sample, detail = _parse_health(
        b'{"crash_count": 2, "usage": {"opened": 5}}', common_pb2.HealthSample()
    )
    assert (sample.crash_count, sample.feature_error_count) == (2, 0)
    assert detail == '{"usage":{"opened":5}}'
    sample, detail = _parse_health(b"", common_pb2.HealthSample())
    assert (sample.crash_count, sample.feature_error_count, detail) == (0, 0, "")
    sample, detail = _parse_health(b'{"crash_count": -1}', common_pb2.HealthSample())
    assert sample.feature_error_count == 1 and "crash_count" in detail
    sample, detail = _parse_health(b"all good", common_pb2.HealthSample())
    assert sample.feature_error_count == 1 and detail.startswith("health hook output")
