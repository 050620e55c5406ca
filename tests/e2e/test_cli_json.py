"""`--format json` of every command against one real control plane, checked field by field
against the proto (README, Scripts); identifiers taken back by a unique prefix; a rollout's
devices by state; a device's timeline."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import (
    audit_pb2,
    bundle_pb2,
    fleet_pb2,
    report_pb2,
    rollout_pb2,
    token_pb2,
    webhook_pb2,
)
from tests.broker_harness import private_broker
from tests.conftest import endpoint
from tests.e2e.scenario import publish, run_rollout, start_fleet, wait_for

pytestmark = pytest.mark.e2e

VERSION = "2.0.0"  # the ev9 devices of the fleet fail to install it


@dataclass
class World:
    stack: DevStack
    client: Client
    rollout_id: str
    bundle: str
    device_id: str
    token_id: str
    work: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("json-output")
    with private_broker(work / "broker") as broker:
        stack = DevStack.start(work / "stack", broker=endpoint(broker))
        client = Client.connect(stack.server, stack.admin_token)
        try:
            publish(client, stack, work, VERSION)
            fleet = start_fleet(stack, work, 12, failures=[f"ev9@{VERSION}=1.0"])
            try:
                done = run_rollout(client, VERSION, [1_000_000], timeout=180)
                wait_for(
                    lambda: _get(client, done.rollout_id).device_states["FAILED"] > 0,
                    what="a failed install",
                    timeout=120,
                )
            finally:
                fleet.stop()
            token = client.tokens.CreateToken(
                token_pb2.CreateTokenRequest(
                    token=token_pb2.Token(display_name="scripts", role="viewer")
                ),
                metadata=client.metadata,
            ).token
            client.webhooks.CreateWebhook(
                webhook_pb2.CreateWebhookRequest(
                    webhook=webhook_pb2.Webhook(url="https://hooks.example.com/ota")
                ),
                metadata=client.metadata,
            )
            device = client.fleet.ListDevices(
                fleet_pb2.ListDevicesRequest(selector="model = ev9"), metadata=client.metadata
            ).devices[0]
            yield World(
                stack,
                client,
                done.rollout_id,
                f"bundles/lane-assist/{VERSION}",
                device.device_id,
                token.token_id,
                work,
            )
        finally:
            client.close()
            stack.stop()


def _get(client: Client, rollout_id: str) -> rollout_pb2.Rollout:
    r: rollout_pb2.Rollout = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return r


def _ota(
    capsys: pytest.CaptureFixture[str], world: World, *args: str, fmt: str = "json"
) -> tuple[int, str, str]:
    capsys.readouterr()
    base = ["--server", world.stack.server, "--token", world.stack.admin_token, "--format", fmt]
    code = ota_main([*args, *base])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys: pytest.CaptureFixture[str], world: World, *args: str) -> Any:
    code, out, err = _ota(capsys, world, *args)
    assert code == 0, err
    return json.loads(out)


# --- the convention, checked against the proto ---------------------------------------------

HEX = re.compile(r"[0-9a-f]*")
BASE64_HASH = re.compile(r"[A-Za-z0-9+/]{43}=")
INTEGERS = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}


def conforms(value: Any, desc: Descriptor, where: str = "$") -> None:
    """`value` is `desc` as the convention has it: every field, each of its kind."""
    assert isinstance(value, dict), f"{where}: not an object"
    names = {f.name for f in desc.fields}
    assert set(value) == names, f"{where}: fields {sorted(set(value) ^ names)} differ"
    for f in desc.fields:
        v, at = value[f.name], f"{where}.{f.name}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            assert isinstance(v, dict), at
            for k, item in v.items():
                _scalar(f.message_type.fields_by_name["value"], item, f"{at}[{k}]")
        elif f.is_repeated:
            assert isinstance(v, list), at
            for i, item in enumerate(v):
                _scalar(f, item, f"{at}[{i}]")
        else:
            _scalar(f, v, at)


def _scalar(f: FieldDescriptor, v: Any, at: str) -> None:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        if v is None:
            return
        full = f.message_type.full_name
        if full == "google.protobuf.Timestamp":
            assert isinstance(v, str) and v.endswith("Z"), at
        elif full == "google.protobuf.Duration":
            assert isinstance(v, int | float) and not isinstance(v, bool), at
        else:
            conforms(v, f.message_type, at)
    elif f.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(v, str) and HEX.fullmatch(v), f"{at}: {v!r} is not hex"
    elif f.type == FieldDescriptor.TYPE_ENUM:
        assert isinstance(v, str) and v in f.enum_type.values_by_name, f"{at}: {v!r}"
    elif f.type in INTEGERS:
        assert isinstance(v, int) and not isinstance(v, bool), f"{at}: {v!r} is not a number"
    elif f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        assert isinstance(v, int | float) and not isinstance(v, bool), at
    elif f.type == FieldDescriptor.TYPE_BOOL:
        assert isinstance(v, bool), at
    else:
        assert isinstance(v, str), at


def _no_base64_hashes(value: Any) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _no_base64_hashes(v)
    elif isinstance(value, list):
        for v in value:
            _no_base64_hashes(v)
    elif isinstance(value, str):
        assert not BASE64_HASH.fullmatch(value), f"{value!r} looks like a base64 hash"


# (command line, list field or None for one object, message the object or items are)
Case = tuple[Callable[[World], list[str]], str | None, Descriptor]
CASES: dict[str, Case] = {
    "bundle list": (lambda w: ["bundle", "list"], "bundles", bundle_pb2.Bundle.DESCRIPTOR),
    "bundle get": (lambda w: ["bundle", "get", w.bundle], None, bundle_pb2.Bundle.DESCRIPTOR),
    "fleet list": (
        lambda w: ["fleet", "list", "--limit", "5"],
        "devices",
        fleet_pb2.ListDevicesResponse.DESCRIPTOR,
    ),
    "fleet get": (
        lambda w: ["fleet", "get", w.device_id],
        None,
        fleet_pb2.GetDeviceResponse.DESCRIPTOR,
    ),
    "fleet register": (
        lambda w: [
            *("fleet", "register", "json-new", "--model", "ev6"),
            *("--region", "eu", "--firmware", "4.2.0"),
        ],
        None,
        fleet_pb2.RegisterDevicesResponse.DESCRIPTOR,
    ),
    "rollout list": (lambda w: ["rollout", "list"], "rollouts", rollout_pb2.Rollout.DESCRIPTOR),
    "rollout status": (
        lambda w: ["rollout", "status", w.rollout_id],
        None,
        rollout_pb2.Rollout.DESCRIPTOR,
    ),
    "rollout plan": (
        lambda w: ["rollout", "plan", w.rollout_id],
        None,
        rollout_pb2.RolloutPlanPreview.DESCRIPTOR,
    ),
    "rollout history": (
        lambda w: ["rollout", "history", w.rollout_id],
        "events",
        rollout_pb2.RolloutEvent.DESCRIPTOR,
    ),
    "rollout devices": (
        lambda w: ["rollout", "devices", w.rollout_id],
        "devices",
        rollout_pb2.RolloutDevice.DESCRIPTOR,
    ),
    "rollout create": (
        lambda w: ["rollout", "create", "--feature", "lane-assist", "--version", VERSION],
        None,
        rollout_pb2.Rollout.DESCRIPTOR,
    ),
    "tokens list": (lambda w: ["tokens", "list"], "tokens", token_pb2.Token.DESCRIPTOR),
    "tokens create": (
        lambda w: ["tokens", "create", "--role", "viewer", "--name", "json"],
        None,
        token_pb2.CreateTokenResponse.DESCRIPTOR,
    ),
    "webhooks list": (lambda w: ["webhooks", "list"], "webhooks", webhook_pb2.Webhook.DESCRIPTOR),
    "audit": (lambda w: ["audit"], "entries", audit_pb2.AuditEntry.DESCRIPTOR),
    "report": (
        lambda w: ["report", w.rollout_id],
        None,
        report_pb2.RolloutReport.DESCRIPTOR,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_command_prints_json_in_the_one_convention(
    name: str, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, items, desc = CASES[name]
    doc = _json(capsys, world, *argv(world))
    assert isinstance(doc, dict)
    _no_base64_hashes(doc)
    if items is None:
        conforms(doc, desc)
        return
    if desc.name.endswith("Response"):  # a whole response: items, page token and more
        conforms(doc, desc)
        assert isinstance(doc["next_page_token"], str)
        return
    assert set(doc) == {items, "next_page_token"}, sorted(doc)
    assert isinstance(doc["next_page_token"], str)
    assert doc[items], f"{name}: nothing listed to check"
    for i, item in enumerate(doc[items]):
        conforms(item, desc, f"$.{items}[{i}]")


def test_hashes_in_json_are_the_hex_the_table_shows(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = _json(capsys, world, "bundle", "get", world.bundle)
    served = world.client.bundles.GetBundle(
        bundle_pb2.GetBundleRequest(name=world.bundle), metadata=world.client.metadata
    )
    assert bundle["sha256"] == served.sha256.hex() and bundle["length"] == served.length
    code, table, _ = _ota(capsys, world, "bundle", "list", "--wide", fmt="table")
    assert code == 0 and served.sha256.hex() in table


def test_identifiers_are_taken_by_a_unique_prefix(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    # The token created for this test, revoked by the first 12 characters of its id.
    code, out, err = _ota(capsys, world, "tokens", "revoke", world.token_id[:12])
    assert code == 0, err
    assert json.loads(out)["token_id"] == world.token_id and json.loads(out)["revoked"] is True

    rollout = _json(capsys, world, "rollout", "status", world.rollout_id[:-2])
    assert rollout["rollout_id"] == world.rollout_id
    world.client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id="prefix-car-1", model="ev6", region="eu", firmware="4.2.0"
                )
            ]
        ),
        metadata=world.client.metadata,
    )
    device = _json(capsys, world, "fleet", "get", "prefix-c")
    assert device["device"]["device_id"] == "prefix-car-1"
    bundle = _json(capsys, world, "bundle", "get", "bundles/lane-assist/2.")
    assert bundle["name"] == world.bundle

    # Every rollout id starts "r-": ambiguous, refused with the candidates on one line.
    draft = _json(
        capsys, world, "rollout", "create", "--feature", "lane-assist", "--version", VERSION
    )["rollout_id"]
    code, out, err = _ota(capsys, world, "rollout", "status", "r-")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and world.rollout_id in err and "Traceback" not in err
    deleted = _json(capsys, world, "rollout", "delete", draft[:-1], "--reason", "json")
    assert deleted == {"deleted": draft}
    code, _, err = _ota(capsys, world, "tokens", "revoke", "zz")
    assert code == 1 and "NOT_FOUND" in err


def test_rollout_devices_by_state_say_which_failed_and_why(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    failed = _json(capsys, world, "rollout", "devices", world.rollout_id, "--state", "failed")
    assert failed["devices"] and failed["next_page_token"] == ""
    fleet = {
        d.device_id: d.model
        for d in world.client.fleet.ListDevices(
            fleet_pb2.ListDevicesRequest(page_size=100), metadata=world.client.metadata
        ).devices
    }
    for d in failed["devices"]:
        assert d["state"] == "FAILED" and fleet[d["device_id"]] == "ev9"
        assert d["reason"] != "FAILURE_REASON_UNSPECIFIED" and d["update_time"]
    everyone = _json(capsys, world, "rollout", "devices", world.rollout_id)["devices"]
    assert {d["device_id"] for d in failed["devices"]} == {
        d["device_id"] for d in everyone if d["state"] == "FAILED"
    }
    # Paged one at a time, the same devices in device-id order.
    one = _json(capsys, world, "rollout", "devices", world.rollout_id, "--limit", "1")
    assert [d["device_id"] for d in one["devices"]] == [everyone[0]["device_id"]]
    assert one["next_page_token"] != ""
    two = _json(
        capsys,
        world,
        "rollout",
        "devices",
        world.rollout_id,
        "--limit",
        "1",
        "--page-token",
        one["next_page_token"],
    )
    assert [d["device_id"] for d in two["devices"]] == [everyone[1]["device_id"]]

    code, table, _ = _ota(
        capsys, world, "rollout", "devices", world.rollout_id, "--state", "FAILED", fmt="table"
    )
    assert code == 0 and failed["devices"][0]["device_id"] in table
    with pytest.raises(SystemExit) as refused:
        _ota(capsys, world, "rollout", "devices", world.rollout_id, "--state", "LOST")
    assert refused.value.code == 2 and "--state" in capsys.readouterr().err


def test_fleet_get_shows_the_device_timeline(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    got = _json(capsys, world, "fleet", "get", world.device_id)
    events = got["events"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert {"NOTIFIED", "FAILED"} <= {e["state"] for e in events}
    assert all(e["rollout_id"] == world.rollout_id for e in events if e["state"] == "FAILED")
    last_two = _json(capsys, world, "fleet", "get", world.device_id, "--events", "2")["events"]
    assert last_two == events[-2:]
    code, table, _ = _ota(capsys, world, "fleet", "get", world.device_id, fmt="table")
    assert code == 0 and "Timeline" in table and "FAILED" in table


def test_watch_prints_json_lines_in_the_convention(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    # The shared rollout ends here (no other test needs it paused), so watch returns.
    aborted = _json(capsys, world, "rollout", "abort", world.rollout_id, "--reason", "json")
    assert aborted["state"] == "ROLLOUT_STATE_ABORTED"
    code, out, err = _ota(capsys, world, "rollout", "watch", world.rollout_id)
    assert code == 3, err  # ended, but not completed
    lines = out.splitlines()
    assert lines
    for line in lines:
        conforms(json.loads(line), rollout_pb2.RolloutUpdate.DESCRIPTOR)


@pytest.mark.parametrize(
    ("args", "key", "ident"),
    [
        (("fleet", "list"), "devices", "device_id"),
        (("rollout", "list"), "rollouts", "rollout_id"),
        (("bundle", "list"), "bundles", "name"),
    ],
)
def test_a_list_is_walked_page_by_page_to_the_whole_list(
    world: World, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], key: str, ident: str
) -> None:
    whole = [x[ident] for x in _json(capsys, world, *args, "--limit", "1000")[key]]
    assert whole
    walked: list[str] = []
    token = ""
    for _ in range(len(whole) + 1):
        page = _json(capsys, world, *args, "--limit", "2", "--page-token", token)
        assert len(page[key]) <= 2
        walked += [x[ident] for x in page[key]]
        token = page["next_page_token"]
        if not token:
            break
    assert walked == whole
    if len(whole) > 2:
        # A table shows one page and says, on stderr, how to get the next.
        code, _out, err = _ota(capsys, world, *args, "--limit", "2", fmt="table")
        assert code == 0 and "more: --page-token " in err
