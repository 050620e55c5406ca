"""The release engineer's journey through the real commands: ota dev, ota-sim, ota bundle/rollout/report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _env_values(env_file: Path) -> dict[str, str]:
    values = {}
    for line in env_file.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = value
    return values


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], subprocess.Popen[str]]]:
    state = tmp_path / "dev"
    process = _spawn(str(BIN / "ota"), "dev", "--state-dir", str(state), "--port", "0")
    try:
        wait_for(lambda: (state / "env").exists() or process.poll() is not None, what="ota dev")
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        yield state, _env_values(state / "env"), process
    finally:
        _stop(process)


def _ota(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ota"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_release_engineer_rolls_out_a_bundle_with_the_cli(
    dev: tuple[Path, dict[str, str], subprocess.Popen[str]], tmp_path: Path
) -> None:
    state, env, dev_process = dev
    sim = _spawn(
        str(BIN / "ota-sim"),
        "run",
        "--devices",
        "24",
        "--root",
        str(state / "keys" / "root.json"),
        "--server",
        env["OTA_SERVER"],
        "--token",
        env["OTA_TOKEN"],
        "--state-dir",
        str(tmp_path / "sim"),
    )
    try:
        assert sim.stdout is not None
        assert "24 devices online" in sim.stdout.readline()

        listed = _ota(env, "fleet", "list", "--selector", "model = ev9", "--format", "json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["total_size"] == 8

        bundle = tmp_path / "wipers-1.0.0.bin"
        bundle.write_bytes(os.urandom(20_000))
        key = state / "keys" / "offline" / "release.pem"
        published = _ota(
            env,
            "bundle",
            "publish",
            str(bundle),
            "--feature",
            "wipers",
            "--version",
            "1.0.0",
            "--model",
            "ev6",
            "--model",
            "ev9",
            "--model",
            "niro",
            "--key",
            str(key),
        )
        assert published.returncode == 0, published.stderr

        created = _ota(
            env,
            "rollout",
            "create",
            "--feature",
            "wipers",
            "--version",
            "1.0.0",
            "--stages",
            "25%,100%",
            "--format",
            "json",
        )
        assert created.returncode == 0, created.stderr
        rollout_id = json.loads(created.stdout)["rollout_id"]
        assert _ota(env, "rollout", "start", rollout_id).returncode == 0
        watched = _ota(env, "rollout", "watch", rollout_id)
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "complete" in watched.stdout

        csv_report = _ota(env, "report", rollout_id, "--format", "csv")
        assert "state,ACTIVE,24" in csv_report.stdout.splitlines()
        history = _ota(env, "rollout", "history", rollout_id, "--format", "json")
        actions = [e["action"] for e in json.loads(history.stdout)["events"]]
        assert actions[:3] == ["create", "start", "advance"] and actions[-1] == "complete"
    finally:
        assert _stop(sim) == 0
    broker_pid = int((state / "broker" / "mosquitto.pid").read_text())
    assert _stop(dev_process) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(broker_pid, 0)  # ota dev stopped the broker it started
