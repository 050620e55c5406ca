"""`ota-agent` with a device certificate: enrollment, mutual TLS everywhere, restarts, renewal.

The agent is a real child process provisioned with `ota fleet register
--identity certificate --agent-config DIR`; a real Mosquitto demands device
certificates on its TLS listener (with the subscription guard), and the
control plane serves the device port and the HTTPS delivery origin, both
demanding the device's current certificate.
"""

from __future__ import annotations

import json
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ota.agent.config import render_config
from ota.cli.main import main as ota_main
from ota.clock import ManualClock
from ota.device.enroll import Identity, csr_pem, key_pem, new_key
from ota.v1 import bundle_pb2, bundle_pb2_grpc, fleet_pb2, rollout_pb2
from tests.e2e.agents import AgentProcess, write_hooks
from tests.e2e.cert_stack import CertStack, cert_stack
from tests.e2e.scenario import publish, run_rollout, wait_for

pytestmark = pytest.mark.e2e

FEATURE = "lane-assist"  # what tests.e2e.scenario.publish releases


def provision(stack: CertStack, base: Path, device_id: str) -> AgentProcess:
    """`ota fleet register --identity certificate --agent-config DIR`, as an operator runs it."""
    directory = base / device_id
    directory.mkdir(parents=True)
    hooks = write_hooks(base / "hooks") if not (base / "hooks").exists() else base / "hooks"
    ca = str(stack.pki.ca_cert)
    rc = ota_main(
        [
            *("fleet", "register", device_id, "--model", "ev6", "--region", "eu"),
            *("--firmware", "4.2.0", "--identity", "certificate"),
            *("--server", stack.server, "--token", stack.token, "--tls-ca", ca),
            *("--agent-config", str(directory), "--root", str(stack.keys.root_json)),
            *("--device-server", stack.device_server),
            *("--origin-url", stack.origin_url, "--origin-ca", ca),
            *("--agent-state-dir", "state", "--hooks-dir", str(hooks)),
        ]
    )
    assert rc == 0
    config = directory / "agent.toml"
    assert config.stat().st_mode & 0o777 == 0o600
    doc = tomllib.loads(config.read_text())
    assert doc["identity"] == "certificate" and doc["enrollment_token"]
    assert "secret" not in doc
    doc["health_interval_seconds"] = 0
    doc["hooks"] = {**doc["hooks"], "timeout_seconds": 20}
    config.write_text(render_config(doc))
    root = directory / "device"
    root.mkdir()
    return AgentProcess(device_id, config, root, {})


def recorded_serial(stack: CertStack, device_id: str) -> str:
    device = stack.client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id), metadata=stack.client.metadata
    ).device
    serial: str = device.certificate_serial
    return serial


def identity_dir(agent: AgentProcess) -> Path:
    return agent.config.parent / "state" / "identity"


def on_disk(agent: AgentProcess) -> x509.Certificate:
    return x509.load_pem_x509_certificate((identity_dir(agent) / "cert.pem").read_bytes())


def test_the_agent_enrolls_follows_over_mutual_tls_and_keeps_its_certificate(
    tmp_path: Path,
) -> None:
    with cert_stack(tmp_path / "stack", origin=True) as stack:
        agent = provision(stack, tmp_path / "devices", "car-1")
        agent.start()
        try:
            agent.wait_following()
            assert "enrolled: certificate" in agent.log_since_start()
            # The first line names the address it calls: the device port, not the API's.
            assert f"device port {stack.device_server}, broker" in agent.log_since_start()
            cert = on_disk(agent)
            serial = format(cert.serial_number, "x")
            assert serial == recorded_serial(stack, "car-1")
            name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            assert name == "car-1"
            # The key was made on the device and only its owner may read it.
            assert stat.S_IMODE((identity_dir(agent) / "key.pem").stat().st_mode) == 0o600
            assert stat.S_IMODE(identity_dir(agent).stat().st_mode) == 0o700

            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
            assert dict(final.device_states) == {"ACTIVE": 1}
            assert agent.current(FEATURE) == "1.0.0"
            # The bundle came from the origin, which lets only device certificates in.
            metrics = stack.plane.origin.metrics  # type: ignore[union-attr]
            assert metrics.count("bundle", 200) >= 1
            assert metrics.count("other", 403) == 0
            # The broker has no account for the device: its certificate is its name.
            users = [line.split(":")[0] for line in stack.files.password_file.read_text().split()]
            assert "car-1" not in users and all(u.startswith("ota-control") for u in users)

            assert agent.stop() == 0
            agent.start()
            agent.wait_following()
            # The same certificate after a restart; the spent token is not asked again.
            # (publish() makes bytes from the version's length: a new length, new bytes.)
            assert "enrolled" not in agent.log_since_start()
            assert (
                format(on_disk(agent).serial_number, "x")
                == serial
                == recorded_serial(stack, "car-1")
            )
            publish(stack.client, stack, tmp_path, "1.10.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.10.0", [1_000_000])
            assert dict(final.device_states) == {"ACTIVE": 1}
            assert agent.current(FEATURE) == "1.10.0"
        finally:
            agent.stop()


def test_a_revoked_agent_is_dropped_and_says_the_broker_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with cert_stack(tmp_path / "stack", crl=True) as stack:
        agent = provision(stack, tmp_path / "devices", "car-r")
        agent.start()
        try:
            agent.wait_following()
            base = ("--server", stack.server, "--token", stack.token)
            assert (
                ota_main(["fleet", "revoke", "car-r", *base, "--tls-ca", str(stack.pki.ca_cert)])
                == 0
            )
            refused = "closed the connection before accepting it"
            wait_for(
                lambda: refused in agent.log_since_start(), what="the refusal logged", timeout=60
            )
            log = agent.log_since_start()
            assert "refused the TLS handshake or this device's certificate (revoked" in log
            # Said once for the outage, not at every retry; the agent stays up.
            broker_log = stack.files.log_file
            wait_for(
                lambda: broker_log.read_text().count("certificate verify failed") >= 2,
                what="a second refused handshake",
                timeout=60,
            )
            assert agent.log_since_start().count(refused) == 1
            assert agent.alive()
            # Shown offline, as the metrics count it; listed only when revoked ones are asked for.
            tls = ("--tls-ca", str(stack.pki.ca_cert), "--format", "json")
            capsys.readouterr()
            assert ota_main(["fleet", "get", "car-r", *base, *tls]) == 0
            device = json.loads(capsys.readouterr().out)["device"]
            assert (device["revoked"], device["online"]) == (True, False)
            assert ota_main(["fleet", "list", *base, *tls]) == 0
            assert json.loads(capsys.readouterr().out)["devices"] == []
            assert ota_main(["fleet", "list", "--all", *base, *tls]) == 0
            listed = json.loads(capsys.readouterr().out)["devices"]
            assert [(d["device_id"], d["revoked"], d["online"]) for d in listed] == [
                ("car-r", True, False)
            ]
        finally:
            agent.stop()


def test_an_agent_with_a_refused_token_says_so_and_exits(tmp_path: Path) -> None:
    with cert_stack(tmp_path / "stack", origin=True) as stack:
        agent = provision(stack, tmp_path / "devices", "car-t")
        doc = tomllib.loads(agent.config.read_text())
        doc["enrollment_token"] = "not-the-token"
        agent.config.write_text(render_config(doc))
        agent.start()
        assert agent.process is not None
        assert agent.process.wait(timeout=60) == 2
        log = agent.log_since_start()
        assert "enrollment_token: enrollment refused (UNAUTHENTICATED" in log
        assert not (identity_dir(agent) / "cert.pem").exists()


def test_the_agent_renews_a_certificate_due_for_renewal_and_carries_on(tmp_path: Path) -> None:
    # The control plane's clock starts 61 days back: the certificate signed for the
    # device then is valid by the wall clock (which the TLS layers and the agent go
    # by) and due for renewal by it. Moving the control plane's clock on afterwards
    # makes the renewed certificate a fresh one.
    clock = ManualClock(datetime.now(UTC) - timedelta(days=61))
    with cert_stack(tmp_path / "stack", clock=clock, origin=True) as stack:
        agent = provision(stack, tmp_path / "devices", "car-r")
        # Provisioned at the factory: the key made on the device, the request signed by
        # the operator (`ota fleet sign-csr`), both put into the agent's state.
        key = new_key()
        issued = stack.client.fleet.SignDeviceCsr(
            fleet_pb2.SignDeviceCsrRequest(device_id="car-r", csr=csr_pem(key, "car-r")),
            metadata=stack.client.metadata,
        )
        factory = Identity(
            "car-r", key_pem(key), issued.certificate.encode(), issued.ca_certificate.encode()
        )
        factory.save(identity_dir(agent))
        assert factory.due(datetime.now(UTC))
        clock.advance(timedelta(days=61))

        agent.start()
        try:
            wait_for(
                lambda: "renewed: certificate" in agent.log_since_start(),
                what="the agent renewing its certificate",
                timeout=60,
            )
            wait_for(
                lambda: (
                    "following desired state generation"
                    in agent.log_since_start().split("renewed: certificate", 1)[1]
                ),
                what="the agent following with its renewed certificate",
                timeout=60,
            )
            renewed = Identity.load(identity_dir(agent), "car-r")
            assert renewed.serial != factory.serial
            assert renewed.serial == recorded_serial(stack, "car-r")
            assert not renewed.due(datetime.now(UTC))
            assert "enrolled" not in agent.log_since_start()
            # The factory certificate is refused from the moment the new one was issued.
            old = grpc.secure_channel(
                stack.device_server, factory.grpc_credentials(stack.pki.ca_cert.read_bytes())
            )
            with pytest.raises(grpc.RpcError) as refused:
                bundle_pb2_grpc.BundleServiceStub(old).GetDesiredState(
                    bundle_pb2.GetDesiredStateRequest(device_id="car-r"), timeout=30
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            old.close()

            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert dict(final.device_states) == {"ACTIVE": 1}
            assert agent.current(FEATURE) == "1.0.0"
            # Renewed once: the new certificate is not due, so no second renewal.
            assert agent.log_since_start().count("renewed: certificate") == 1
        finally:
            agent.stop()


def test_a_certificate_agent_config_without_the_device_port_registers_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with cert_stack(tmp_path / "stack", origin=True) as stack:
        ca = str(stack.pki.ca_cert)
        device = [*("fleet", "register", "car-9", "--model", "ev6", "--region", "eu")]
        base = [
            *("--firmware", "4.2.0", "--identity", "certificate"),
            *("--server", stack.server, "--token", stack.token, "--tls-ca", ca),
            *("--agent-config", str(tmp_path), "--root", str(stack.keys.root_json)),
        ]
        assert ota_main([*device, *base]) == 1
        assert ota_main([*device, *base, "--device-server", stack.device_server,
                         "--origin-url", "http://cdn.example"]) == 1  # fmt: skip
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith("ota: error: device_server: a certificate device's agent needs")
        assert err[1].startswith("ota: error: origin_url: a certificate device presents")
        assert not (tmp_path / "agent.toml").exists()
        with pytest.raises(grpc.RpcError) as lookup:
            stack.client.fleet.GetDevice(
                fleet_pb2.GetDeviceRequest(device_id="car-9"), metadata=stack.client.metadata
            )
        assert lookup.value.code() == grpc.StatusCode.NOT_FOUND
