"""Scenario files: what they describe, and every mistake named by its field."""

from __future__ import annotations

import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_sim.processes import parse_slice, share
from device_sim.profile import DeviceProfile
from device_sim.scenario import Scenario, load_scenario, parse_scenario
from ota.errors import InvalidArgument

EXAMPLE = """
seed: 7
prefix: car
fleet:
  - {count: 6, model: ev6, region: eu, firmware: 4.2.0}
  - {count: 4, model: ev9, region: us, firmware: 4.1, labels: {ring: beta, site: 7}}
failures:
  - {model: ev9, region: us, version: 2.0.0, install: 1.0, crash: 0.25}
  - {model: "ev*", install: 0.1}
health_interval: 30
clock_skew:
  - {devices: "car-00000[0-1]", seconds: -7200}
latency:
  - {region: us, seconds: 0.2}
churn:
  - {region: eu, fraction: 0.5, after: 5, offline: 10, every: 60}
misbehaving:
  - {kind: garbage, count: 2, messages: 5}
  - {kind: foreign_topic, model: ev9}
"""


def scenario(text: str = EXAMPLE) -> Scenario:
    return parse_scenario(yaml.safe_load(text))


def test_the_fleet_is_composed_in_the_order_of_its_groups() -> None:
    s = scenario()
    devices = s.devices()
    assert s.size == len(devices) == 10
    assert devices[0] == DeviceProfile("car-000000", "ev6", "eu", "4.2.0")
    # 4.1 is read by YAML as a number; a firmware written so is still text.
    assert devices[9] == DeviceProfile(
        "car-000009", "ev9", "us", "4.1", (("ring", "beta"), ("site", "7"))
    )
    assert s.seed == 7 and s.health_interval == 30.0


def test_failure_rules_pick_devices_by_model_region_and_firmware_first_rule_wins() -> None:
    s = scenario()
    ev9_us = DeviceProfile("car-000009", "ev9", "us", "4.1")
    ev6_eu = DeviceProfile("car-000000", "ev6", "eu", "4.2.0")
    assert s.failures_for(ev9_us).rates == {("ev9", "2.0.0"): 1.0, ("ev9", "*"): 0.1}
    assert s.failures_for(ev6_eu).rates == {("ev6", "*"): 0.1}
    assert s.health_for(ev9_us).crash_rate("ev9", "2.0.0") == 0.25
    assert s.health_for(ev6_eu).crash_rate("ev6", "2.0.0") == 0.0
    rng = random.Random(1)
    assert all(s.failures_for(ev9_us).install_fails("ev9", "2.0.0", rng) for _ in range(20))


def test_usage_rules_give_each_device_its_rate_by_model_region_and_version() -> None:
    s = scenario(
        EXAMPLE
        + "usage:\n  - {region: us, version: 2.0.0, rate: 0.2}\n  - {model: ev6, rate: 0.9}\n"
    )
    ev9_us = DeviceProfile("car-000009", "ev9", "us", "4.1")
    ev6_eu = DeviceProfile("car-000000", "ev6", "eu", "4.2.0")
    assert s.health_for(ev9_us).use_rate("ev9", "2.0.0") == 0.2
    assert s.health_for(ev9_us).use_rate("ev9", "1.0.0") == 0.0
    assert s.health_for(ev6_eu).use_rate("ev6", "1.0.0") == 0.9
    # The crash rules are untouched by the usage rules.
    assert s.health_for(ev9_us).crash_rate("ev9", "2.0.0") == 0.25


def test_clock_skew_latency_churn_and_misbehaviour_select_their_devices() -> None:
    s = scenario()
    skew = s.clock_skew_fn()
    assert skew is not None
    assert skew("car-000001") == timedelta(hours=-2)
    assert skew("car-000002") == timedelta(0)
    devices = s.devices()
    assert s.latency_for(devices[9]) == 0.2 and s.latency_for(devices[0]) == 0.0
    churning = s.churning(s.churn[0], devices)
    assert len(churning) == 3  # half of the 6 in eu
    assert all(d.startswith("car-00000") and int(d[-1]) < 6 for d in churning)
    garbage, foreign = s.misbehaving
    assert s.misbehaving_devices(garbage, devices) == ["car-000000", "car-000001"]
    assert s.misbehaving_devices(foreign, devices) == ["car-000006"]
    assert foreign.messages == 1


def test_a_scenario_needs_only_a_fleet() -> None:
    s = scenario("fleet: [{count: 3, model: ev6, region: eu}]")
    assert [d.device_id for d in s.devices()] == ["sim-000000", "sim-000001", "sim-000002"]
    assert s.clock_skew_fn() is None
    assert not s.failures and not s.churn and not s.misbehaving
    assert s.unreachable_for is None  # the simulator's default window


def test_a_scenario_sets_how_long_devices_wait_out_the_control_plane() -> None:
    s = scenario("fleet: [{count: 1, model: ev6, region: eu}]\nunreachable_for: 90")
    assert s.unreachable_for == 90.0


BAD: list[tuple[str, str]] = [
    ("- 1", "scenario"),
    ("seed: 1", "fleet"),
    ("fleet: []", "fleet"),
    ("fleet: {count: 1}", "fleet"),
    ("fleet: [{count: 0, model: ev6, region: eu}]", "fleet[0].count"),
    ("fleet: [{count: two, model: ev6, region: eu}]", "fleet[0].count"),
    ("fleet: [{count: 1, region: eu}]", "fleet[0].model"),
    ("fleet: [{count: 1, model: 'ev 6', region: eu}]", "fleet[0].model"),
    ("fleet: [{count: 1, model: ev6, region: eu, colour: red}]", "fleet[0].colour"),
    ("fleets: []", "fleets"),
    ("fleet: [{count: 1, model: ev6, region: eu, labels: [ring]}]", "fleet[0].labels"),
    ("fleet: [{count: 1, model: ev6, region: eu, labels: {ring: 'a b'}}]", "fleet[0].labels.ring"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nfailures: [{model: ev6}]", "failures[0]"),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nfailures: [{install: 1.5}]",
        "failures[0].install",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nchurn: [{fraction: 0.5}]",
        "churn[0].offline",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nchurn: [{fraction: 0.5, offline: -1}]",
        "churn[0].offline",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nlatency: [{seconds: .inf}]",
        "latency[0].seconds",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nclock_skew: [{devices: x}]",
        "clock_skew[0].seconds",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nmisbehaving: [{kind: explode}]",
        "misbehaving[0].kind",
    ),
    (
        "fleet: [{count: 1, model: ev6, region: eu}]\nmisbehaving: [{kind: flood, messages: 0}]",
        "misbehaving[0].messages",
    ),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nmisbehaving: {kind: flood}", "misbehaving"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nhealth_interval: soon", "health_interval"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nunreachable_for: -1", "unreachable_for"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nunreachable_for: 1e9", "unreachable_for"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nusage: [{model: ev6}]", "usage[0].rate"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nusage: [{rate: 2}]", "usage[0].rate"),
    ("fleet: [{count: 1, model: ev6, region: eu}]\nusage: [{rate: 1, often: 3}]", "usage[0].often"),
]


@pytest.mark.parametrize(("text", "field"), BAD)
def test_every_mistake_names_its_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_scenario(yaml.safe_load(text))
    assert caught.value.field == field, str(caught.value)


def test_a_file_that_is_not_yaml_or_not_there_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("fleet: [{count: 1\n")
    with pytest.raises(InvalidArgument, match="line") as caught:
        load_scenario(broken)
    assert caught.value.field == "scenario"
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")


def test_the_cli_refuses_a_bad_scenario_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "fleet: [{count: 1, model: ev6, region: eu}]\nchurn: [{fraction: 2, offline: 1}]\n"
    )
    root = tmp_path / "root.json"
    root.write_text("{}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_sim.cli",
            "run",
            "--root",
            str(root),
            "--scenario",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ota-sim: error: churn[0].fraction: must be a probability in [0, 1], got 2.0"
    ]


ONE = "fleet: [{count: 1, model: ev6, region: eu}]\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("fleet: [{count: 5000000000, model: ev6, region: eu}]", "fleet[0].count"),
        (
            "fleet: [{count: 900000, model: ev6, region: eu}, {count: 900000, model: a, region: b}]",
            "fleet",
        ),
        ("fleet: [{count: 1, model: " + "m" * 65 + ", region: eu}]", "fleet[0].model"),
        (ONE + "seed: " + "9" * 40, "seed"),
        (ONE + "health_interval: 1.0e+400", "health_interval"),
        (ONE + "health_interval: .nan", "health_interval"),
        (ONE + "clock_skew: [{seconds: -99999999999}]", "clock_skew[0].seconds"),
        (ONE + "latency: [{seconds: 86400}]", "latency[0].seconds"),
        (ONE + "churn: [{fraction: 0.5, offline: " + "9" * 400 + "}]", "churn[0].offline"),
        (ONE + "churn: [{fraction: 0.5, offline: 1, every: 400000000}]", "churn[0].every"),
        (ONE + "misbehaving: [{kind: garbage, messages: 5000000000}]", "misbehaving[0].messages"),
        (ONE + "misbehaving: [{kind: garbage, after: .inf}]", "misbehaving[0].after"),
    ],
)
def test_scenario_numbers_out_of_bounds_are_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_scenario(yaml.safe_load(text))
    assert e.value.field == field, str(e.value)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    "text",
    ["[" * 3000, "fleet: " + "[" * 20 + "]" * 20, "x: '" + "y" * (1024 * 1024) + "'"],
    ids=["brackets", "deep", "size"],
)
def test_a_scenario_file_too_deep_or_big_is_one_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as e:
        load_scenario(path)
    assert e.value.field == "scenario" and "\n" not in str(e.value)


@pytest.mark.parametrize(("n", "count"), [(10, 3), (3, 3), (10_000, 2), (1, 2)])
def test_processes_share_the_fleet_in_contiguous_slices(n: int, count: int) -> None:
    items: list[Any] = list(range(n))
    slices = [share(items, i, count) for i in range(count)]
    assert [x for s in slices for x in s] == items
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_a_slice_is_i_of_n() -> None:
    assert parse_slice("") == (0, 1)
    assert parse_slice("1/2") == (1, 2)
    for bad in ("2/2", "x/2", "1"):
        with pytest.raises(InvalidArgument):
            parse_slice(bad)
