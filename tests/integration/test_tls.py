"""TLS and mTLS on a real gRPC port, and MQTT over TLS to a private Mosquitto."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ota.broker import BrokerSettings
from ota.broker.process import free_port, start_private_broker
from ota.cli.main import main as ota_main
from ota.client import Client
from ota.devstack import DevStack
from ota.tls import ClientTls, generate_dev_pki
from ota.transport.mqtt import MqttLink
from ota.transport.topics import Topics
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle, MqttProbe
from tests.conftest import endpoint

pytestmark = pytest.mark.integration


def _list(client: Client) -> rollout_pb2.ListRolloutsResponse:
    return client.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(), metadata=client.metadata, timeout=20
    )


def _code(client: Client) -> grpc.StatusCode:
    try:
        _list(client)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    finally:
        client.close()
    return grpc.StatusCode.OK


@pytest.fixture
def tls_stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), tls=True)
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def mtls_stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), mtls=True)
    try:
        yield dev
    finally:
        dev.stop()


def test_calls_over_tls_succeed_and_plaintext_to_the_tls_port_fails(tls_stack: DevStack) -> None:
    assert tls_stack.client_tls is not None
    client = Client.connect(tls_stack.server, tls_stack.admin_token, tls_stack.client_tls)
    try:
        assert _list(client).rollouts == []
        health = health_pb2_grpc.HealthStub(client.channel).Check(
            health_pb2.HealthCheckRequest(), timeout=20
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        client.close()
    assert _code(Client.connect(tls_stack.server, tls_stack.admin_token)) == (
        grpc.StatusCode.UNAVAILABLE
    )
    # TLS does not replace the bearer token.
    no_token = Client.connect(tls_stack.server, "", tls_stack.client_tls)
    assert _code(no_token) == grpc.StatusCode.UNAUTHENTICATED


def test_a_server_certificate_from_another_ca_is_refused(
    tls_stack: DevStack, tmp_path: Path
) -> None:
    stranger = generate_dev_pki(tmp_path / "stranger")
    client = Client.connect(tls_stack.server, tls_stack.admin_token, ClientTls(stranger.ca_cert))
    assert _code(client) == grpc.StatusCode.UNAVAILABLE


def test_the_cli_reaches_a_tls_server_with_its_flags(
    tls_stack: DevStack, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tls_stack.pki is not None
    base = ["--server", tls_stack.server, "--token", tls_stack.admin_token, "--format", "json"]
    assert ota_main(["rollout", "list", *base, "--tls-ca", str(tls_stack.pki.ca_cert)]) == 0
    capsys.readouterr()
    assert ota_main(["rollout", "list", *base]) == 1
    plaintext = capsys.readouterr().err
    assert plaintext.startswith(
        f"ota: error: UNAVAILABLE: cannot reach the control plane at {tls_stack.server}"
    )
    assert plaintext.rstrip().endswith(
        "is it a TLS port (then --tls or --tls-ca) or a plaintext one (then neither)?"
    )
    assert ota_main(["rollout", "list", *base, "--tls-ca", "/nonexistent/ca.pem"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ota: error: tls_ca:") and "Traceback" not in err


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_stack: DevStack, tmp_path: Path) -> None:
    pki = mtls_stack.pki
    assert pki is not None and mtls_stack.client_tls is not None
    with_cert = Client.connect(mtls_stack.server, mtls_stack.admin_token, mtls_stack.client_tls)
    assert _code(with_cert) == grpc.StatusCode.OK
    without_cert = Client.connect(mtls_stack.server, mtls_stack.admin_token, ClientTls(pki.ca_cert))
    assert _code(without_cert) == grpc.StatusCode.UNAVAILABLE
    stranger = generate_dev_pki(tmp_path / "stranger")
    foreign = ClientTls(pki.ca_cert, stranger.client_cert, stranger.client_key)
    assert _code(Client.connect(mtls_stack.server, mtls_stack.admin_token, foreign)) == (
        grpc.StatusCode.UNAVAILABLE
    )


def test_mqtt_over_tls_to_a_private_mosquitto(tmp_path: Path) -> None:
    pki = generate_dev_pki(tmp_path / "tls")
    tls_port = free_port()
    settings = BrokerSettings(
        port=0,
        tls_port=tls_port,
        tls_cafile=str(pki.ca_cert),
        tls_certfile=str(pki.server_cert),
        tls_keyfile=str(pki.server_key),
    )
    password = "control-secret-for-tls-test"
    process, files = start_private_broker(
        tmp_path / "broker", control_password=password, settings=settings
    )
    try:
        conf = files.conf.read_text()
        assert f"listener {tls_port} 127.0.0.1" in conf
        assert f"certfile {pki.server_cert}" in conf
        with MqttProbe("127.0.0.1", tls_port, "ota-control", password) as probe:
            probe.client.tls_set(ca_certs=str(pki.ca_cert))
            probe.connect_ok()
            assert not probe.subscribe("ota/v1/devices/x/events").is_failure
            probe.publish("ota/v1/devices/x/events", b"over tls")
            assert probe.messages.get(timeout=20).payload == b"over tls"
        # A plaintext MQTT CONNECT to the TLS port gets no CONNACK: the broker
        # waits for a TLS ClientHello and drops the connection.
        with socket.create_connection(("127.0.0.1", tls_port), timeout=20) as raw:
            raw.sendall(bytes.fromhex("101000044d5154540502003c000000036f7461"))
            try:
                reply = raw.recv(4)
            except (ConnectionResetError, TimeoutError):
                reply = b""
            assert not reply.startswith(b"\x20")  # 0x20 = CONNACK
        # A client that does not trust the broker's CA fails the handshake.
        context = ssl.create_default_context()
        with (
            socket.create_connection(("127.0.0.1", tls_port), timeout=20) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        # The control plane's own link, configured by an mqtts:// URL and a CA file.
        link = MqttLink(
            f"mqtts://127.0.0.1:{tls_port}",
            username="ota-control",
            password=password,
            topics=Topics("ota/v1"),
            ca_file=str(pki.ca_cert),
        )
        link.start(timeout=20)
        assert link.connected.is_set()
        link.stop()
    finally:
        process.stop()
