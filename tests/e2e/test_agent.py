"""Three `ota-agent` processes against a real control plane and a private Mosquitto.

The devices are provisioned with `ota fleet register --agent-config` and do
their work through shell hooks the test writes; what the hooks leave in each
device's directory is what the test checks, besides what the control plane
recorded.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ota.agent.config import load_config, render_config
from ota.broker.process import free_port
from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import common_pb2, fleet_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.agents import (
    AgentProcess,
    device_events,
    device_online,
    provision_agent,
    stop_all,
    wait_rollout,
    write_hooks,
)
from tests.e2e.scenario import create_from_plan, wait_for

pytestmark = pytest.mark.e2e

FEATURE = "nav"


@pytest.fixture(params=["plaintext", "tls", "mtls"])
def any_stack(
    request: pytest.FixtureRequest, tmp_path: Path, broker: BrokerHandle
) -> Iterator[DevStack]:
    """`ota dev`'s stack, serving gRPC in plaintext, over TLS (`ota dev --tls`) or mTLS."""
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        tls=request.param == "tls",
        mtls=request.param == "mtls",
    )
    try:
        yield dev
    finally:
        dev.stop()


def client_for(stack: DevStack) -> Client:
    return Client.connect(stack.server, stack.admin_token, stack.client_tls)


def publish(
    client: Client, stack: DevStack, tmp: Path, version: str, feature: str = FEATURE
) -> bytes:
    data = f"{feature} {version} ".encode() * 400
    path = tmp / f"{feature}-{version}.bin"
    path.write_bytes(data)
    client.publish_bundle(
        path,
        feature=feature,
        version=version,
        models=["ev6"],
        min_firmware="4.0",
        keys=[stack.keys.release_key],
    )
    return data


def start_rollout(
    client: Client, version: str, gates: str = "", soak: str = "0s", feature: str = FEATURE
) -> str:
    """One stage of 100 %; with a soak it stays RUNNING that long after exposing everyone."""
    plan = (
        f"feature: {feature}\nversion: {version}\n"
        f"stages: [{{exposure: 100%, min_soak: {soak}}}]\n" + gates
    )
    created = create_from_plan(client, plan)
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id, reason="test"),
        metadata=client.metadata,
    )
    return created.rollout_id


def start_agents(stack: DevStack, tmp_path: Path, count: int = 3) -> list[AgentProcess]:
    """`count` agents; the last sends health samples every second and logs JSON."""
    hooks = write_hooks(tmp_path / "hooks")
    agents = [
        provision_agent(
            stack,
            tmp_path / "devices",
            f"car-{i}",
            hooks,
            health_interval=1.0 if i == count - 1 else 0.0,
            json_logs=i == count - 1,
        )
        for i in range(count)
    ]
    for agent in agents:
        agent.start()
    for agent in agents:
        agent.wait_following()
    return agents


@pytest.mark.timeout(280)
def test_a_rollout_installs_through_the_hooks_and_a_failing_install_rolls_back(
    any_stack: DevStack, tmp_path: Path
) -> None:
    stack = any_stack
    client = client_for(stack)
    agents = start_agents(stack, tmp_path)
    try:
        # 1.0.0 goes everywhere: install copies the verified bundle into a slot,
        # activate points the device at it.
        v1 = publish(client, stack, tmp_path, "1.0.0")
        first = start_rollout(client, "1.0.0")
        wait_rollout(
            client,
            first,
            lambda r: (
                r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED
                and dict(r.device_states) == {"ACTIVE": 3}
            ),
            what="1.0.0 ACTIVE on three agents",
        )
        for agent in agents:
            assert agent.current(FEATURE) == "1.0.0"
            assert (agent.device_root / "slots" / FEATURE / "1.0.0").read_bytes() == v1
            assert agent.hook_lines() == [
                "start install nav 1.0.0 prev=",
                "done install nav 1.0.0",
                "start activate nav 1.0.0 prev=",
                "done activate nav 1.0.0",
            ]

        # 2.0.0: car-1's install hook fails. Once all three have answered, one failure
        # in three trips the gate, and the rollback reverts the two that installed it.
        (agents[1].device_root / "fail-install-2.0.0").touch()
        publish(client, stack, tmp_path, "2.0.0")
        second = start_rollout(
            client,
            "2.0.0",
            "gates: [{metric: install_failure, max: 10%, min_sample: 3, action: rollback}]\n",
            soak="1h",
        )
        final = wait_rollout(
            client,
            second,
            lambda r: (
                r.state == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
                and dict(r.device_states).get("ROLLED_BACK", 0) == 3
            ),
            what="the gate to roll 2.0.0 back on every agent",
        )
        assert "install-failure gate tripped" in final.state_reason, final.state_reason
        for agent in (agents[0], agents[2]):
            assert agent.current(FEATURE) == "1.0.0"
            lines = agent.hook_lines()
            assert lines[4:] == [
                "start install nav 2.0.0 prev=1.0.0",
                "done install nav 2.0.0",
                "start activate nav 2.0.0 prev=1.0.0",
                "done activate nav 2.0.0",
                "start rollback nav 1.0.0 prev=2.0.0",
                "done rollback nav 1.0.0",
            ], lines
        # car-1 never left 1.0.0: nothing to roll back, no hook run for it.
        assert agents[1].current(FEATURE) == "1.0.0"
        assert agents[1].hook_lines()[4:] == ["start install nav 2.0.0 prev=1.0.0"]
        failed = [
            e
            for e in device_events(client, "car-1")
            if e.state == common_pb2.FAILED and e.rollout_id == second  # type: ignore[attr-defined]
        ]
        assert [e.error_code for e in failed] == [common_pb2.INSTALL_FAILED]  # type: ignore[attr-defined]
        assert "install hook exited 7: no room for nav 2.0.0" in failed[0].detail  # type: ignore[attr-defined]

        # The health hook's samples arrive, with the usage it reported.
        def usage_reported() -> bool:
            return any(
                e.health.crash_count == 0  # type: ignore[attr-defined]
                and e.detail == '{"usage":{"opened":2}}'  # type: ignore[attr-defined]
                and e.feature == FEATURE  # type: ignore[attr-defined]
                and not e.rollout_id  # type: ignore[attr-defined]
                for e in device_events(client, "car-2")
            )

        wait_for(usage_reported, what="a periodic health sample with usage from car-2")
        logged = [json.loads(line) for line in agents[2].log_since_start().splitlines()]
        assert {entry["device_id"] for entry in logged} == {"car-2"}

        # The kill switch: the feature goes off on every device through deactivate.
        client.rollouts.KillRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=second, reason="test: kill switch"),
            metadata=client.metadata,
        )
        wait_for(
            lambda: all(a.hook_lines()[-1:] == ["done deactivate nav 1.0.0"] for a in agents),
            what="deactivate on every agent",
        )
        for agent in agents:
            assert agent.current(FEATURE) == "off"
            assert agent.hook_lines()[-2] == "start deactivate nav 1.0.0"

        # SIGTERM: each agent stops cleanly and says it is offline.
        for agent in agents:
            assert agent.stop() == 0
            assert "stopped cleanly" in agent.log_since_start()
        wait_for(
            lambda: not any(device_online(client, a.device_id) for a in agents),
            what="the agents to be offline",
        )
    finally:
        stop_all(agents)
        client.close()


MISBEHAVING_INSTALL = """#!/bin/sh
case "$OTA_FEATURE" in
    nonzero) echo "flash write error at block 7" >&2; exit 3 ;;
    hang) sleep 120 ;;
    flood) head -c 10485760 /dev/zero | tr '\\0' x ;;
esac
"""


@pytest.mark.timeout(240)
def test_misbehaving_hooks_fail_the_install_and_the_agent_stays_up(
    stack: DevStack, tmp_path: Path
) -> None:
    client = client_for(stack)
    hooks = write_hooks(tmp_path / "hooks", {"install": MISBEHAVING_INSTALL})
    agent = provision_agent(stack, tmp_path / "devices", "car-0", hooks, hook_timeout=3)
    agent.start()
    try:
        agent.wait_following()
        assert agent.process is not None
        pid = agent.process.pid

        def failure_of(feature: str) -> str:
            """The detail of the device's INSTALL_FAILED for `feature`, once it arrives."""
            found: list[str] = []

            def arrived() -> bool:
                found[:] = [
                    e.detail  # type: ignore[attr-defined]
                    for e in device_events(client, "car-0")
                    if e.feature == feature  # type: ignore[attr-defined]
                    and e.state == common_pb2.FAILED  # type: ignore[attr-defined]
                    and e.error_code == common_pb2.INSTALL_FAILED  # type: ignore[attr-defined]
                ]
                return bool(found)

            wait_for(arrived, what=f"INSTALL_FAILED for {feature}", timeout=90)
            return found[0]

        def roll_out(feature: str) -> str:
            publish(client, stack, tmp_path, "1.0.0", feature)
            return start_rollout(client, "1.0.0", feature=feature)

        for feature in ("nonzero", "hang", "flood"):
            roll_out(feature)
        assert failure_of("nonzero") == "install hook exited 3: flash write error at block 7"
        assert failure_of("hang").startswith("install hook timed out after 3s")
        flood = failure_of("flood")
        assert flood.startswith("install hook wrote more than 1048576 bytes of output: xxx")
        assert len(flood) <= 480

        (hooks / "install").unlink()
        roll_out("missing")
        assert failure_of("missing") == f"install hook {hooks / 'install'} does not exist"

        (hooks / "install").write_text("#!/bin/sh\nexit 0\n")
        (hooks / "install").chmod(0o644)
        roll_out("noexec")
        assert failure_of("noexec") == f"install hook {hooks / 'install'} is not executable"

        # The same process, still following: a good hook installs the next feature.
        write_hooks(hooks)
        good = roll_out("good")
        wait_rollout(
            client,
            good,
            lambda r: (
                r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED
                and dict(r.device_states) == {"ACTIVE": 1}
            ),
            what="the good feature's rollout to complete",
        )
        assert agent.current("good") == "1.0.0"

        # An activate that fails is undone with rollback to the version that ran before.
        activate = (hooks / "activate").read_text()
        (hooks / "activate").write_text(
            activate.replace("set -e\n", 'set -e\n[ "$OTA_VERSION" = 2.0.0 ] && exit 5\n', 1)
        )
        publish(client, stack, tmp_path, "2.0.0", "good")
        start_rollout(client, "2.0.0", feature="good")
        wait_for(
            lambda: "done rollback good 1.0.0" in agent.hook_lines(),
            what="rollback to good 1.0.0 after the failed activate",
        )
        assert agent.current("good") == "1.0.0"
        assert failure_of("good") == "activate hook exited 5"
        assert agent.alive() and agent.process.pid == pid
        assert agent.stop() == 0
    finally:
        stop_all([agent])
        client.close()


def test_registering_with_a_mistake_in_the_agent_options_registers_nothing(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", stack.server, "--token", stack.admin_token]
    device = ["fleet", "register", "car-9", "--model", "ev6", "--region", "eu", "--firmware", "4.2"]
    config = str(tmp_path / "car-9.toml")
    assert ota_main([*device, *base, "--agent-config", config, "--root", "/nonexistent.json"]) == 1
    missing_dir = str(tmp_path / "no" / "car-9.toml")
    root = str(stack.keys.root_json)
    assert ota_main([*device, *base, "--agent-config", missing_dir, "--root", root]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "ota: error: root: /nonexistent.json is not a file",
        f"ota: error: agent_config: directory {tmp_path / 'no'} does not exist",
    ]
    client = client_for(stack)
    with pytest.raises(grpc.RpcError) as lookup:
        client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id="car-9"), metadata=client.metadata
        )
    assert lookup.value.code() == grpc.StatusCode.NOT_FOUND
    client.close()


def test_an_agent_config_path_ending_in_a_slash_is_a_directory_made_for_it(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", stack.server, "--token", stack.admin_token]
    base += ["--root", str(stack.keys.root_json)]
    device = ["fleet", "register", "car-8", "--model", "ev6", "--region", "eu", "--firmware", "4.2"]
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert ota_main([*device, *base, "--agent-config", f"{a_file}/"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"ota: error: agent_config: {a_file} is not a directory"
    ]
    assert ota_main([*device, *base, "--agent-config", f"{tmp_path / 'car-8'}/"]) == 0
    config = tmp_path / "car-8" / "agent.toml"
    assert config.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "car-8" / "agent.root.json").is_file()
    assert load_config(config).device_id == "car-8"


def test_sigterm_while_a_download_waits_for_the_control_plane_stops_without_a_failure(
    stack: DevStack, tmp_path: Path
) -> None:
    client = client_for(stack)
    hooks = write_hooks(tmp_path / "hooks")
    agent = provision_agent(stack, tmp_path / "devices", "car-0", hooks)
    # The agent's gRPC address leads nowhere: the desired state still arrives over
    # MQTT, and the download retries with pauses of up to a minute.
    doc = tomllib.loads(agent.config.read_text())
    doc["server"] = f"127.0.0.1:{free_port()}"
    agent.config.write_text(render_config(doc))
    publish(client, stack, tmp_path, "1.0.0")
    start_rollout(client, "1.0.0")
    agent.start()
    try:
        wait_for(
            lambda: f"{FEATURE} 1.0.0: DOWNLOADING" in agent.log_since_start(),
            what="the agent to start downloading",
        )
        assert agent.stop() == 0  # within the harness's bound, not after the retries
        log = agent.log_since_start()
        assert "stopped cleanly" in log
        assert "FAILED" not in log and agent.hook_lines() == []
    finally:
        stop_all([agent])
        client.close()
