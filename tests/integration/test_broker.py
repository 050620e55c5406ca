"""The generated Mosquitto config against a real broker: credentials, ACL, reload, persistence.

Non-delivery is never asserted by waiting: a marker published after the
forbidden message, on a topic the receiver may read, arrives only after
anything sent before it, so its arrival proves the absence.
"""

from __future__ import annotations

import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.broker import (
    BrokerSettings,
    MosquittoProcess,
    PasswordFile,
    find_mosquitto,
    mosquitto_hash,
    verify_mosquitto_hash,
    write_broker_config,
)
from ota.broker import process as broker_process
from ota.errors import InvalidArgument, Unavailable
from tests.broker_harness import BrokerHandle, MqttProbe, private_broker

pytestmark = pytest.mark.integration

ROOT = "ota/v1"
SHARE = f"$share/ota-ingest/{ROOT}/devices/+/events"
NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87
PACKET_TOO_LARGE = 149  # MQTT 5 reason code 0x95


def topic(device_id: str, kind: str) -> str:
    return f"{ROOT}/devices/{device_id}/{kind}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with private_broker(tmp_path) as handle:
        yield handle


@pytest.fixture
def devices(broker: BrokerHandle) -> dict[str, str]:
    return broker.add_devices(["dev-a", "dev-b"])


# --- password file ---------------------------------------------------------------------------


def test_hash_has_mosquitto_2_format_and_verifies_mosquitto_passwd_output(
    tmp_path: Path,
) -> None:
    encoded = mosquitto_hash("s3cret", salt=b"\x00" * 12)
    assert re.fullmatch(r"\$7\$101\$AAAAAAAAAAAAAAAA\$[A-Za-z0-9+/]{86}==", encoded)
    assert verify_mosquitto_hash("s3cret", encoded)
    assert not verify_mosquitto_hash("wrong", encoded)

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(path), "alice", "s3cret"], check=True)
    assert PasswordFile(path).verify("alice", "s3cret")
    assert not PasswordFile(path).verify("alice", "wrong")


def test_password_file_edits_keep_other_lines_and_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "passwords"
    path.write_text("# operators' note\nlegacy:" + mosquitto_hash("old") + "\n")
    pw = PasswordFile(path)

    pw.set_many({"dev-a": "a", "dev-b": "b"})
    pw.set("dev-a", "a2")
    assert pw.remove("dev-b")
    assert not pw.remove("dev-b")

    assert pw.usernames() == ["legacy", "dev-a"]
    assert pw.verify("legacy", "old")
    assert pw.verify("dev-a", "a2")
    assert path.read_text().startswith("# operators' note\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("name", ["", "a/b", "dev+", "dev#", "a:b", "a b", "-dev", "x" * 129])
def test_usernames_that_would_break_topics_or_the_file_are_refused(
    tmp_path: Path, name: str
) -> None:
    with pytest.raises(InvalidArgument):
        PasswordFile(tmp_path / "pw").set(name, "secret")


# --- credentials -----------------------------------------------------------------------------


def test_right_password_connects_and_wrong_or_unknown_is_not_authorized(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.client("dev-a", devices["dev-a"]) as ok:
        assert not ok.connect().is_failure
    with broker.client("dev-a", devices["dev-b"]) as wrong:
        assert wrong.connect().value == NOT_AUTHORIZED
    with broker.client("stranger", "whatever") as unknown:
        assert unknown.connect().value == NOT_AUTHORIZED
    with broker.control_client() as control:
        assert not control.connect().is_failure


def test_reload_admits_a_new_device_and_revocation_drops_a_connected_one(
    broker: BrokerHandle,
) -> None:
    secret = "fresh-secret"
    broker.passwords.set("dev-new", secret)
    with broker.client("dev-new", secret) as early:
        # The broker has not re-read the file yet.
        assert early.connect().value == NOT_AUTHORIZED

    broker.reload()
    with broker.client("dev-new", secret) as device:
        device.connect_ok()

        broker.revoke("dev-new")  # remove from the file + SIGHUP
        # Mosquitto 2.0 re-checks connected clients on reload.
        assert device.disconnected.wait(5), "revoked device is still connected"

    with broker.client("dev-new", secret) as again:
        assert again.connect().value == NOT_AUTHORIZED


# --- ACL -------------------------------------------------------------------------------------


def test_device_reads_its_own_desired_state_and_never_another_devices(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.control_client() as control, broker.client("dev-a", devices["dev-a"]) as a:
        control.connect_ok()
        assert not control.publish(topic("dev-a", "desired"), b"A1", retain=True).is_failure
        assert not control.publish(topic("dev-b", "desired"), b"B1", retain=True).is_failure

        a.connect_ok()
        # The subscription guard refuses these; the ACL would also filter delivery.
        assert a.subscribe(topic("dev-b", "desired")).value == NOT_AUTHORIZED
        assert a.subscribe(f"{ROOT}/devices/+/desired").value == NOT_AUTHORIZED
        assert a.subscribe(topic("dev-a", "desired")).value == 1
        retained = a.next_message()
        assert (retained.topic, retained.payload, retained.retain) == (
            topic("dev-a", "desired"),
            b"A1",
            True,
        )

        # Live: B's update first, then a marker on A's own topic.
        assert not control.publish(topic("dev-b", "desired"), b"B2", retain=True).is_failure
        assert not control.publish(topic("dev-a", "desired"), b"A2", retain=True).is_failure
        received = a.messages_until(topic("dev-a", "desired"))
        assert [(m.topic, m.payload) for m in received] == [(topic("dev-a", "desired"), b"A2")]


def test_device_cannot_publish_on_another_devices_topics_or_its_own_desired(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.control_client() as control, broker.client("dev-a", devices["dev-a"]) as a:
        control.connect_ok()
        control.subscribe(SHARE)
        control.subscribe(f"{ROOT}/devices/+/desired")
        a.connect_ok()

        assert a.publish(topic("dev-b", "events"), b"forged").value == NOT_AUTHORIZED
        assert a.publish(topic("dev-b", "state"), b"forged").value == NOT_AUTHORIZED
        assert a.publish(topic("dev-a", "desired"), b"forged").value == NOT_AUTHORIZED
        assert a.publish(topic("dev-a", "events"), b"marker").value == 0

        received = control.messages_until(topic("dev-a", "events"))
        assert [(m.topic, m.payload) for m in received] == [(topic("dev-a", "events"), b"marker")]


def test_device_events_reach_the_control_plane_on_the_shared_subscription(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with (
        broker.control_client() as control,
        broker.client("dev-a", devices["dev-a"]) as a,
        broker.client("dev-b", devices["dev-b"]) as b,
    ):
        control.connect_ok()
        assert control.subscribe(SHARE).value == 1
        a.connect_ok()
        b.connect_ok()

        assert a.publish(topic("dev-a", "events"), b"a-1").value == 0
        assert b.publish(topic("dev-b", "events"), b"b-1").value == 0
        # Nobody reads state here: MQTT 5 then acks "No matching subscribers"
        # (16), a success code, and the retained message is still stored.
        assert a.publish(topic("dev-a", "state"), b"online", retain=True).value == 16

        # Delivered under the real topic, not the $share filter.
        topics = sorted(control.next_message().topic for _ in range(2))
        assert topics == [topic("dev-a", "events"), topic("dev-b", "events")]


def test_extra_control_users_get_the_control_acl(tmp_path: Path) -> None:
    settings = BrokerSettings(port=0, extra_control_usernames=("ota-ingest-2",))
    with private_broker(tmp_path, settings=settings) as broker:
        secret = broker.add_user("ota-ingest-2")
        device_secret = broker.add_device("dev-a")
        with (
            broker.client("ota-ingest-2", secret) as ingest,
            broker.client("dev-a", device_secret) as a,
        ):
            ingest.connect_ok()
            assert ingest.subscribe(SHARE).value == 1
            a.connect_ok()
            assert a.publish(topic("dev-a", "events"), b"e").value == 0
            assert ingest.next_message().topic == topic("dev-a", "events")


def test_broker_config_gives_each_replica_its_own_control_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ota.broker.config import broker_files
    from ota.broker.process import free_port
    from ota.cli.main import main

    port = free_port()
    out = tmp_path / "broker"
    argv = ["broker-config", "--out", str(out), "--port", str(port), "--replica", "cp-2"]
    assert main([*argv, "--ingest-workers", "3"]) == 0
    shown = capsys.readouterr().out
    printed = re.search(r"replica account: cp-2 / (\S+)", shown)
    control = re.search(r"control plane account: ota-control / (\S+)", shown)
    assert printed is not None and control is not None
    with (
        MosquittoProcess(broker_files(out), host="127.0.0.1", port=port),
        MqttProbe("127.0.0.1", port, "cp-2", printed.group(1)) as replica,
        # Each replica's ingest workers: accounts of their own, with its password.
        MqttProbe("127.0.0.1", port, "cp-2-ingest-3", printed.group(1)) as worker,
        MqttProbe("127.0.0.1", port, "ota-control-ingest-1", control.group(1)) as first,
    ):
        replica.connect_ok()
        assert replica.subscribe(SHARE).value == 1
        worker.connect_ok()
        assert worker.subscribe(SHARE).value == 1
        first.connect_ok()
        assert first.subscribe(SHARE).value == 1
    control_users = broker_files(out).control_users_file.read_text().split()
    assert {"cp-2-ingest-3", "ota-control-ingest-3"} <= set(control_users)
    assert "cp-2-ingest-4" not in control_users


def test_broker_config_gives_every_control_account_its_publishing_accounts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ota.broker.config import broker_files
    from ota.broker.process import free_port
    from ota.cli.main import main

    port = free_port()
    out = tmp_path / "broker"
    argv = ["broker-config", "--out", str(out), "--port", str(port), "--replica", "cp-2"]
    assert main([*argv, "--publish-connections", "3"]) == 0
    printed = capsys.readouterr().out
    control = re.search(r"control plane account: ota-control / (\S+)", printed)
    replica = re.search(r"replica account: cp-2 / (\S+)", printed)
    assert control is not None and replica is not None
    accounts = [
        ("ota-control-publish-2", control.group(1)),
        ("ota-control-publish-3", control.group(1)),
        ("cp-2-publish-3", replica.group(1)),
    ]
    with MosquittoProcess(broker_files(out), host="127.0.0.1", port=port):
        for username, password in accounts:
            with MqttProbe("127.0.0.1", port, username, password) as publishing:
                publishing.connect_ok()
                assert not publishing.publish("ota/v1/devices/car-1/desired", b"x").is_failure
                assert publishing.publish("ota/v1/devices/car-1/events", b"x").is_failure
        with MqttProbe("127.0.0.1", port, "ota-control-publish-4", control.group(1)) as extra:
            assert extra.connect().is_failure


def test_will_on_a_devices_own_state_is_accepted_and_delivered(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    will = (topic("dev-a", "state"), b"offline", True)
    with (
        broker.control_client() as control,
        broker.client("dev-a", devices["dev-a"], will=will) as a,
    ):
        control.connect_ok()
        control.subscribe(f"{ROOT}/devices/+/state")
        a.connect_ok()
        a.disconnect(with_will=True)
        message = control.next_message()
        assert (message.topic, message.payload) == (topic("dev-a", "state"), b"offline")


def test_oversized_publish_closes_the_connection(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.client("dev-a", devices["dev-a"]) as a:
        a.connect_ok()
        a.client.publish(topic("dev-a", "events"), b"x" * (broker.settings.max_packet_size + 1))
        assert a.disconnected.wait(5)
        assert a.disconnect_reason is not None
        assert a.disconnect_reason.value == PACKET_TOO_LARGE


# --- persistence -----------------------------------------------------------------------------


def test_retained_desired_state_survives_a_broker_restart(
    broker: BrokerHandle, devices: dict[str, str]
) -> None:
    with broker.control_client() as control:
        control.connect_ok()
        assert not control.publish(topic("dev-a", "desired"), b"gen-7", retain=True).is_failure

    broker.restart()

    with broker.client("dev-a", devices["dev-a"]) as a:
        a.connect_ok()
        a.subscribe(topic("dev-a", "desired"))
        message = a.next_message()
        assert (message.payload, message.retain) == (b"gen-7", True)


@pytest.mark.parametrize("restart_while_offline", [False, True], ids=["offline", "restart"])
def test_persistent_ingest_session_queues_events_while_the_control_plane_is_offline(
    broker: BrokerHandle, devices: dict[str, str], restart_while_offline: bool
) -> None:
    def ingester() -> MqttProbe:
        return broker.control_client(clean_start=False, session_expiry_s=300)

    with ingester() as control:
        control.connect_ok()
        assert control.session_present is False
        assert control.subscribe(SHARE).value == 1
        control.disconnect()

    with broker.client("dev-a", devices["dev-a"]) as a:
        a.connect_ok()
        for n in range(3):
            assert a.publish(topic("dev-a", "events"), b"e%d" % n).value == 0

    if restart_while_offline:
        broker.restart()

    with ingester() as control:
        control.connect_ok()
        assert control.session_present is True
        payloads = [control.next_message().payload for _ in range(3)]
        assert payloads == [b"e0", b"e1", b"e2"]


# --- process ---------------------------------------------------------------------------------


def test_start_refuses_a_port_someone_else_listens_on(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        files = write_broker_config(tmp_path, BrokerSettings(port=port), control_password="secret")
        with pytest.raises(Unavailable, match="already in use"):
            MosquittoProcess(files, host="127.0.0.1", port=port).start()


def test_a_broken_config_fails_fast_with_the_brokers_message(tmp_path: Path) -> None:
    port = broker_process.free_port()
    files = write_broker_config(tmp_path, BrokerSettings(port=port), control_password="secret")
    files.conf.write_text(files.conf.read_text() + "no_such_option 1\n")
    process = MosquittoProcess(files, host="127.0.0.1", port=port)
    with pytest.raises(Unavailable, match="no_such_option"):
        process.start()
    assert not process.running


def test_missing_binary_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(broker_process, "_FALLBACK_BINARY", "/nonexistent/mosquitto")
    with pytest.raises(Unavailable, match="apt-get install mosquitto"):
        find_mosquitto()
