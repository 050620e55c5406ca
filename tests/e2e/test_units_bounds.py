"""Shares that cannot be misread and input that cannot poison state, through the real CLI,
the real `ota-sim` and raw gRPC, against a real control plane on a real port."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.domain.bucketing import is_exposed
from ota.v1 import fleet_pb2, report_pb2, rollout_pb2
from tests.broker_harness import private_broker
from tests.conftest import endpoint
from tests.e2e.scenario import publish

pytestmark = pytest.mark.e2e

HEAD = "feature: lane-assist\nversion: 1.0.0\n"
DEVICES = [f"car-{i:03d}" for i in range(40)]


def _ota(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ota.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": stack.admin_token},
        timeout=60,
        check=False,
    )


def _one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a refused command (exit 1, no traceback)."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """One control plane for the module: every refusal must leave it as it was."""
    tmp = tmp_path_factory.mktemp("units-bounds")
    with ExitStack() as cleanup:
        broker = cleanup.enter_context(private_broker(tmp / "broker"))
        dev = DevStack.start(tmp / "stack", broker=endpoint(broker))
        cleanup.callback(dev.stop)
        yield dev


@pytest.fixture(scope="module")
def world(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    tmp_path = tmp_path_factory.mktemp("bundle")
    client = Client.connect(stack.server, stack.admin_token)
    client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=d, model="ev6", region="eu", firmware="4.2.0"
                )
                for d in DEVICES
            ]
        ),
        metadata=client.metadata,
    )
    publish(client, stack, tmp_path, "1.0.0")
    yield client
    client.close()


def _refused(client: Client, request: rollout_pb2.CreateRolloutRequest) -> str:
    with pytest.raises(grpc.RpcError) as e:
        client.rollouts.CreateRollout(request, metadata=client.metadata)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    return str(e.value.details())


def _rollout_ids(client: Client) -> set[str]:
    listed = client.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(page_size=1000), metadata=client.metadata
    )
    return {r.rollout_id for r in listed.rollouts}


def _nothing_stored_and_everything_answers(
    stack: DevStack, client: Client, before: set[str]
) -> None:
    assert _rollout_ids(client) == before
    client.reports.GetFeatureReport(
        report_pb2.GetFeatureReportRequest(feature="lane-assist"), metadata=client.metadata
    )


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ("stages: [{exposure: 50}, {exposure: 100}]\n", "stages[0].exposure"),
        ("stages: [{exposure: 10%}, {exposure: 40}]\n", "stages[1].exposure"),
        ("holdout: 10\nstages: [{exposure: 100%}]\n", "holdout"),
        (
            "stages: [{exposure: 100%}]\ngates: [{metric: install_failure, max: 5}]\n",
            "gates[0].max",
        ),
    ],
    ids=["exposure", "exposure-after-10%", "holdout", "gate-max"],
)
def test_a_bare_number_in_a_plan_is_refused_by_the_cli_and_the_server(
    stack: DevStack, world: Client, tmp_path: Path, plan: str, field: str
) -> None:
    before = _rollout_ids(world)
    path = tmp_path / "plan.yaml"
    path.write_text(HEAD + plan)
    line = _one_error(_ota(stack, "rollout", "create", "--plan", str(path)))
    assert line.startswith(f"ota: error: {field}: ") and "has no unit" in line
    assert "%" in line and "ppm" in line  # it shows the accepted forms
    # The server refuses it too, for a client that does not check first.
    details = _refused(world, rollout_pb2.CreateRolloutRequest(plan_document=HEAD + plan))
    assert details.startswith(f"{field}: ") and "has no unit" in details
    _nothing_stored_and_everything_answers(stack, world, before)


def test_share_flags_need_their_unit_and_say_what_stage_one_exposes(
    stack: DevStack, world: Client
) -> None:
    before = _rollout_ids(world)
    base = ("rollout", "create", "--feature", "lane-assist", "--version", "1.0.0")
    line = _one_error(_ota(stack, *base, "--stages", "10,100"))
    assert line == (
        "ota: error: --stages: 10 has no unit: write a percentage like 10%, "
        "or parts per million like 100000ppm"
    )
    line = _one_error(_ota(stack, *base, "--max-failure", "5"))
    assert line.startswith("ota: error: --max-failure: 5 has no unit")
    line = _one_error(_ota(stack, *base, "--stages", "40%,10%"))
    assert line == "ota: error: --stages: exposure must not decrease: 10% after 40%"
    helped = _ota(stack, "rollout", "create", "--help").stdout
    options, _, examples = helped.partition("examples:")
    for flag in ("--stages", "--max-failure"):
        assert "e.g." in options.split(flag)[-1].split("--")[0], helped
        assert flag in examples, helped
    _nothing_stored_and_everything_answers(stack, world, before)

    created = _ota(stack, *base, "--stages", "25%,500000ppm,100%")
    assert created.returncode == 0, created.stderr
    rollout_id = created.stdout.split()[1]
    salt = bytes.fromhex(
        world.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=world.metadata
        ).salt_hex
    )
    first = sum(is_exposed(salt, d, 250_000) for d in DEVICES)
    assert (
        f"stage 1 of 3 (25%) will expose {first} of {len(DEVICES)} eligible devices"
        in created.stdout
    )
    dry = _ota(stack, "rollout", "plan", rollout_id)
    assert dry.returncode == 0, dry.stderr
    assert "25% (250000 ppm)" in dry.stdout and "50% (500000 ppm)" in dry.stdout
    assert f"{first} of {len(DEVICES)}" in dry.stdout
    assert f"{len(DEVICES)} of {len(DEVICES)}" in dry.stdout


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ("stages: [{exposure: 100%, min_soak: 50000d}]\n", "stages[0].min_soak"),
        ("stages: [{exposure: 100%, min_exposed: 5000000000}]\n", "stages[0].min_exposed"),
        (
            "stages: [{exposure: 100%}]\n"
            "gates: [{metric: install_failure, max: 5%, min_sample: 5000000000}]\n",
            "gates[0].min_sample",
        ),
    ],
    ids=["min_soak", "min_exposed", "min_sample"],
)
def test_values_that_overflow_are_refused_and_poison_nothing(
    stack: DevStack, world: Client, tmp_path: Path, plan: str, field: str
) -> None:
    before = _rollout_ids(world)
    path = tmp_path / "plan.yaml"
    path.write_text(HEAD + plan)
    line = _one_error(_ota(stack, "rollout", "create", "--plan", str(path)))
    assert line.startswith(f"ota: error: {field}: ")
    details = _refused(world, rollout_pb2.CreateRolloutRequest(plan_document=HEAD + plan))
    assert details.startswith(f"{field}: ")
    _nothing_stored_and_everything_answers(stack, world, before)


def test_soak_flag_reads_durations_like_a_plan_and_a_draft_lists_no_stage(
    stack: DevStack, world: Client
) -> None:
    before = _rollout_ids(world)
    base = ("rollout", "create", "--feature", "lane-assist", "--version", "1.0.0")
    line = _one_error(_ota(stack, *base, "--soak", "30 minutes"))
    assert line.startswith("ota: error: --soak: give a duration like 30s, 15m, 2h or 1d")
    line = _one_error(_ota(stack, *base, "--soak", "400d"))
    assert line == "ota: error: --soak: must be at most 365d, got 400d"
    _nothing_stored_and_everything_answers(stack, world, before)

    created = _ota(stack, *base, "--stages", "10%,100%", "--soak", "30m")
    assert created.returncode == 0, created.stderr
    rollout_id = created.stdout.split()[1]
    got = world.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=world.metadata
    )
    assert [s.min_soak_seconds for s in got.stages] == [1800, 1800]
    listed = _ota(stack, "rollout", "list")
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if rollout_id in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[3:5] == ["DRAFT", "-"], row  # not started: no stage, as `status` says


@pytest.mark.parametrize(
    ("stage", "gate", "field"),
    [
        ({"min_soak_seconds": 4_000_000_000}, None, "stages[0].min_soak_seconds"),
        ({"deadline_seconds": 4_000_000_000}, None, "stages[0].deadline_seconds"),
        ({"min_exposed": 4_000_000_000}, None, "stages[0].min_exposed"),
        ({}, {"min_sample": 4_000_000_000, "max_failure_ppm": 50_000}, "gate.min_sample"),
        ({}, {"min_sample": 5, "max_failure_ppm": 4_000_000_000}, "gate.max_failure_ppm"),
    ],
)
def test_the_flat_fields_of_create_rollout_have_the_same_bounds(
    stack: DevStack,
    world: Client,
    stage: dict[str, int],
    gate: dict[str, int] | None,
    field: str,
) -> None:
    before = _rollout_ids(world)
    request = rollout_pb2.CreateRolloutRequest(
        feature="lane-assist",
        version="1.0.0",
        stages=[rollout_pb2.Stage(ppm=1_000_000, **stage)],
        gate=rollout_pb2.FailureGate(**gate) if gate else None,
    )
    assert _refused(world, request).startswith(f"{field}: ")
    _nothing_stored_and_everything_answers(stack, world, before)


def test_a_deeply_nested_document_is_one_line_everywhere(
    stack: DevStack, world: Client, tmp_path: Path
) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 3000)
    line = _one_error(_ota(stack, "rollout", "create", "--plan", str(deep)))
    assert line == "ota: error: plan: the plan is nested more than 16 levels deep"
    details = _refused(world, rollout_pb2.CreateRolloutRequest(plan_document="[" * 3000))
    assert details.startswith("plan: ")
    created = world.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(plan_document=HEAD + "stages: [{exposure: 100%}]\n"),
        metadata=world.metadata,
    )
    with pytest.raises(grpc.RpcError) as e:
        world.rollouts.EditRollout(
            rollout_pb2.EditRolloutRequest(
                rollout_id=created.rollout_id, plan_document="{a: " * 3000
            ),
            metadata=world.metadata,
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value.details()).startswith("plan: ")
    big = tmp_path / "big.yaml"
    big.write_text(HEAD + "# " + "x" * 70_000 + "\nstages: [{exposure: 100%}]\n")
    line = _one_error(_ota(stack, "rollout", "create", "--plan", str(big)))
    assert "is larger than the 65536 bytes accepted" in line

    root = tmp_path / "root.json"
    root.write_bytes(stack.keys.root_json.read_bytes())
    sim = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_sim.cli",
            "run",
            "--root",
            str(root),
            "--scenario",
            str(deep),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sim.returncode == 1
    assert sim.stderr.strip().splitlines() == [
        f"ota-sim: error: scenario: {deep} is nested more than 16 levels deep"
    ]
    # The one rollout created is readable through every call.
    report = world.reports.GetRolloutReport(
        report_pb2.GetRolloutReportRequest(rollout_id=created.rollout_id),
        metadata=world.metadata,
    )
    assert report.rollout.rollout_id == created.rollout_id


def test_after_every_refusal_the_cli_still_lists_and_reports(
    stack: DevStack, world: Client
) -> None:
    # Last in the module: whatever the tests above sent, every reader still answers.
    for args in (("rollout", "list"), ("report", "--feature", "lane-assist")):
        proc = _ota(stack, *args)
        assert proc.returncode == 0, proc.stderr
