"""The broker's subscription guard on a real Mosquitto: a device may subscribe to its own
desired topic and nothing else, refused at SUBSCRIBE time; the control plane keeps its own.

Every client here is a real paho client on real credentials against a private
broker running the generated config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from ota.broker import (
    BrokerSettings,
    generate_secret,
    mosquitto_hash,
    subscribe_guard,
    write_broker_config,
)
from ota.errors import FailedPrecondition
from tests.broker_harness import BrokerHandle, private_broker

pytestmark = pytest.mark.integration

ROOT = "ota/v1"
NOT_AUTHORIZED = 0x87  # MQTT 5 SUBACK reason code
FAILURE_311 = 0x80  # MQTT 3.1.1 SUBACK return code


def topic(device_id: str, kind: str) -> str:
    return f"{ROOT}/devices/{device_id}/{kind}"


def forbidden_for(device_id: str, other: str) -> list[str]:
    """Every form of subscription a device must be refused."""
    return [
        f"$share/ota-ingest/{ROOT}/devices/+/events",  # the control plane's own group
        f"$share/ota-ingest/{ROOT}/devices/+/state",
        f"$share/x/{topic(device_id, 'desired')}",  # its own topic, through a share
        f"{ROOT}/devices/+/events",
        f"{ROOT}/devices/+/desired",
        f"{ROOT}/devices/#",
        f"{ROOT}/#",
        "#",
        "+/+/devices/+/desired",
        topic(other, "desired"),
        topic(other, "events"),
        topic(device_id, "events"),
        topic(device_id, "state"),
        f"{topic(device_id, 'desired')}/#",
        f"{topic(device_id, 'desired')}/",  # near misses of its own topic
        f"{topic(device_id, 'desired')}x",
        topic(f"{device_id}x", "desired"),
        f"{ROOT}x/devices/{device_id}/desired",
        f"/{topic(device_id, 'desired')}",
        "$SYS/#",
    ]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with private_broker(tmp_path) as handle:
        yield handle


@pytest.fixture
def devices(broker: BrokerHandle) -> dict[str, str]:
    return broker.add_devices(["dev-a", "dev-b"])


def test_a_device_is_refused_every_subscription_but_its_own_desired_topic(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.control_client() as control, broker.client("dev-a", devices["dev-a"]) as a:
        control.connect_ok()
        a.connect_ok()
        refused = {f: a.subscribe(f).value for f in forbidden_for("dev-a", "dev-b")}
        assert refused == dict.fromkeys(refused, NOT_AUTHORIZED)
        assert a.subscribe(topic("dev-a", "desired")).value == 1

        # The one granted subscription works, and the refused ones deliver nothing:
        # events published now reach only the control plane's subscribers.
        assert control.subscribe(f"$share/ota-ingest/{ROOT}/devices/+/events").value == 1
        with broker.client("dev-b", devices["dev-b"]) as b:
            b.connect_ok()
            assert b.publish(topic("dev-b", "events"), b"b-1").value == 0
        assert control.next_message().topic == topic("dev-b", "events")
        assert not control.publish(topic("dev-b", "desired"), b"B").is_failure
        assert not control.publish(topic("dev-a", "desired"), b"A").is_failure
        received = a.messages_until(topic("dev-a", "desired"))
        assert [(m.topic, m.payload) for m in received] == [(topic("dev-a", "desired"), b"A")]


def test_an_mqtt_311_device_is_refused_too(broker: BrokerHandle, devices: dict[str, str]) -> None:
    with broker.client("dev-a", devices["dev-a"], protocol=mqtt.MQTTv311) as a:
        a.connect_ok()
        assert a.subscribe(f"$share/ota-ingest/{ROOT}/devices/+/events").value == FAILURE_311
        assert a.subscribe(f"{ROOT}/devices/+/desired").value == FAILURE_311
        assert a.subscribe(topic("dev-a", "desired")).value == 1


def test_the_control_plane_keeps_its_subscriptions(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.control_client() as control:
        control.connect_ok()
        for filter_ in (
            f"$share/ota-ingest/{ROOT}/devices/+/events",
            f"$share/ota-ingest/{ROOT}/devices/+/state",
            f"{ROOT}/devices/+/state",
            f"{ROOT}/#",
        ):
            assert control.subscribe(filter_).value == 1, filter_


def test_the_guard_holds_across_a_reload_and_learns_new_control_users(
    tmp_path: Path, broker: BrokerHandle, devices: dict[str, str]
) -> None:
    # A replica added to a running broker: config rewritten, secret set, SIGHUP.
    settings = dataclasses.replace(broker.settings, extra_control_usernames=("cp-2",))
    write_broker_config(
        broker.files.conf.parent, settings, control_password=broker.control_password
    )
    replica_secret = broker.add_user("cp-2")  # writes the password and reloads
    share = f"$share/ota-ingest/{ROOT}/devices/+/events"
    with (
        broker.client("cp-2", replica_secret) as replica,
        broker.client("dev-a", devices["dev-a"]) as a,
    ):
        replica.connect_ok()
        assert replica.subscribe(share).value == 1
        a.connect_ok()
        assert a.subscribe(share).value == NOT_AUTHORIZED
        assert a.subscribe(topic("dev-a", "desired")).value == 1


def test_a_device_whose_name_is_a_wildcard_gets_nothing(broker: BrokerHandle) -> None:
    # Not a name `ota` registers, but one an operator could put in the password file
    # by hand: its "own" topic would be a filter over every device.
    secret = generate_secret()
    path = broker.files.password_file  # PasswordFile refuses the name; Mosquitto does not
    path.write_text(path.read_text() + f"+:{mosquitto_hash(secret)}\n")
    broker.reload()
    with broker.client("+", secret) as wild:
        wild.connect_ok()
        assert wild.subscribe(f"{ROOT}/devices/+/desired").value == NOT_AUTHORIZED


# --- building the guard ----------------------------------------------------------------------


def test_no_compiler_fails_with_one_line_and_writes_no_unguarded_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    out = tmp_path / "broker"
    with pytest.raises(FailedPrecondition) as caught:
        write_broker_config(out, BrokerSettings(), control_password="pw")
    message = str(caught.value)
    assert "\n" not in message
    assert "apt-get install gcc mosquitto-dev libmosquitto-dev" in message
    assert not (out / "mosquitto.conf").exists()


def test_missing_headers_fail_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscribe_guard, "_INCLUDE_DIRS", (tmp_path,))
    with pytest.raises(FailedPrecondition, match=r"mosquitto_broker\.h.*not found.*mosquitto-dev"):
        write_broker_config(tmp_path / "broker", BrokerSettings(), control_password="pw")


def test_cli_without_compiler_says_what_to_install_or_how_to_opt_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ota.cli.main import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    assert main(["broker-config", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "apt-get install gcc" in err

    # The explicit, documented opt-out still writes a config, and says it is unsafe.
    assert main(["broker-config", "--out", str(tmp_path / "b"), "--no-subscribe-guard"]) == 0
    assert "UNSAFE" in capsys.readouterr().out
    conf = (tmp_path / "b" / "mosquitto.conf").read_text()
    assert not re.search(r"^plugin ", conf, re.MULTILINE)


def test_a_prebuilt_guard_is_used_where_no_compiler_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = write_broker_config(tmp_path / "build", BrokerSettings(), control_password="pw")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    settings = BrokerSettings(port=0, subscribe_guard_plugin=str(built.guard_plugin))
    with private_broker(tmp_path / "run", settings=settings) as broker:
        secret = broker.add_device("dev-a")
        with broker.client("dev-a", secret) as a:
            a.connect_ok()
            assert a.subscribe(f"{ROOT}/devices/+/events").value == NOT_AUTHORIZED
