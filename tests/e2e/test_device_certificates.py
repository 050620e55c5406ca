"""Device certificates end to end: enrollment, mutual TLS on MQTT and gRPC, renewal, revocation.

A real Mosquitto runs the generated config with a certificate listener
(`use_identity_as_username`) and the subscription guard; the control plane
runs in this process on a real port, with SQLite, and is given nothing of the
broker's files: no password file, no pid file.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from device_sim.fleet import SimulatedFleet
from device_sim.profile import compose_fleet
from ota.app import ControlPlane
from ota.client import Client
from ota.clock import ManualClock
from ota.device.enroll import Identity, csr_pem, enroll, key_pem, new_key, renew
from ota.errors import Unavailable
from ota.tls import ClientTls
from ota.v1 import bundle_pb2, bundle_pb2_grpc, fleet_pb2, rollout_pb2
from tests.e2e.cert_stack import cert_stack, refused_handshake
from tests.e2e.scenario import MODELS, REGIONS, publish, run_rollout, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 6
REPLICA_B = "ota-replica-b"


def _desired_call(stack_channel: grpc.Channel, device_id: str) -> grpc.StatusCode:
    """The status of a device's GetDesiredState; OK once past authentication.

    With no rollout yet the device has no desired state (NOT_FOUND), which
    still means the caller was let in.
    """
    stub = bundle_pb2_grpc.BundleServiceStub(stack_channel)
    try:
        stub.GetDesiredState(bundle_pb2.GetDesiredStateRequest(device_id=device_id), timeout=30)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return grpc.StatusCode.OK if code == grpc.StatusCode.NOT_FOUND else code
    return grpc.StatusCode.OK


def test_certificate_devices_enroll_and_follow_a_rollout_over_mutual_tls(tmp_path: Path) -> None:
    with cert_stack(tmp_path) as stack:
        fleet = SimulatedFleet(
            compose_fleet(DEVICES, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            stack.fleet_settings(tmp_path / "devices"),
        )
        fleet.start()
        try:
            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
            assert dict(final.device_states) == {"ACTIVE": DEVICES}
        finally:
            fleet.stop()
        # The broker knows no device: its password file holds the control plane's
        # accounts alone (its own, and its ingest workers' and publishers').
        users = [line.split(":")[0] for line in stack.files.password_file.read_text().split()]
        assert "ota-control" in users
        assert not {d.device_id for d in fleet.devices} & set(users)
        assert all(u == "ota-control" or u.startswith("ota-control-") for u in users), users
        device = stack.client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id=fleet.devices[0].device_id),
            metadata=stack.client.metadata,
        ).device
        assert device.identity == fleet_pb2.DEVICE_IDENTITY_CERTIFICATE
        assert device.certificate_serial


def test_a_revoked_device_is_dropped_by_the_broker_and_refused_everywhere(tmp_path: Path) -> None:
    with cert_stack(tmp_path, crl=True) as stack:
        identity = stack.enroll("car-1")
        mqtt = stack.mqtt(identity, tmp_path / "car-1")
        mqtt.connect()
        assert mqtt.subscribe("ota/v1/devices/car-1/desired") == [1]
        channel = stack.device_channel(identity)
        assert _desired_call(channel, "car-1") == grpc.StatusCode.OK

        stack.client.fleet.RevokeDevice(
            fleet_pb2.RevokeDeviceRequest(device_id="car-1"), metadata=stack.client.metadata
        )
        # The live session is dropped, though its certificate is still valid.
        assert mqtt.disconnected.wait(30), "the broker kept the revoked device connected"
        mqtt.close()
        assert _desired_call(channel, "car-1") == grpc.StatusCode.UNAUTHENTICATED
        # The CRL the control plane keeps for the broker refuses the handshake.
        context = identity.ssl_context(stack.pki.ca_cert, tmp_path / "car-1")
        wait_for(
            lambda: refused_handshake(stack.tls_port, context),
            what="the broker refusing the revoked certificate",
            timeout=30,
        )
        channel.close()
        # The broker is up and lets other devices in: the refusal is the CRL's.
        fresh = stack.mqtt(stack.enroll("car-2"), tmp_path / "car-2")
        fresh.connect()
        assert fresh.subscribe("ota/v1/devices/car-2/desired") == [1]
        fresh.close()


def test_renewal_across_expiry_with_a_manual_clock(tmp_path: Path) -> None:
    # The control plane's clock starts 61 days back, so that every certificate it
    # issues is valid for the wall clock too, which the TLS layers go by; moving
    # it on then expires the first certificates for the control plane alone.
    clock = ManualClock(datetime.now(UTC) - timedelta(days=61))
    with cert_stack(tmp_path, clock=clock) as stack:
        renewing = stack.enroll("car-renews")
        lapsing = stack.enroll("car-lapses")
        assert not renewing.due(clock.now())
        clock.advance(timedelta(days=61))
        assert renewing.due(clock.now())

        old_channel = stack.device_channel(renewing)
        renewed = renew(old_channel, "car-renews")
        assert renewed.serial != renewing.serial
        # The old key stops working as soon as the new certificate is issued.
        assert _desired_call(old_channel, "car-renews") == grpc.StatusCode.UNAUTHENTICATED
        new_channel = stack.device_channel(renewed)
        assert _desired_call(new_channel, "car-renews") == grpc.StatusCode.OK

        clock.advance(timedelta(days=30))  # day 91: the first certificates have expired
        assert _desired_call(new_channel, "car-renews") == grpc.StatusCode.OK
        lapsed_channel = stack.device_channel(lapsing)
        assert _desired_call(lapsed_channel, "car-lapses") == grpc.StatusCode.UNAUTHENTICATED
        # The renewed certificate still works on the broker, under the device's name.
        mqtt = stack.mqtt(renewed, tmp_path / "renewed")
        mqtt.connect()
        assert mqtt.subscribe("ota/v1/devices/car-renews/desired") == [1]
        mqtt.close()
        for channel in (old_channel, new_channel, lapsed_channel):
            channel.close()


def test_foreign_expired_and_borrowed_certificates_are_refused(tmp_path: Path) -> None:
    with cert_stack(tmp_path) as stack:
        own = stack.enroll("car-a")
        other = stack.enroll("car-b")
        channel = stack.device_channel(own)
        # Another device's desired state, with one's own certificate.
        assert _desired_call(channel, "car-b") == grpc.StatusCode.PERMISSION_DENIED
        # On the broker the certificate's name decides: car-a cannot subscribe as car-b.
        mqtt = stack.mqtt(own, tmp_path / "car-a")
        mqtt.connect()
        assert mqtt.subscribe("ota/v1/devices/car-b/desired") == [0x87]
        mqtt.close()

        # A certificate the device CA signed for car-b, but not the one recorded for it.
        key = new_key()
        now = datetime.now(UTC)
        minted = stack.ca.sign(csr_pem(key, "car-b").encode(), "car-b", now)
        borrowed = Identity("car-b", key_pem(key), minted.pem, other.ca_certificate)
        assert _desired_call(stack.device_channel(borrowed), "car-b") == (
            grpc.StatusCode.UNAUTHENTICATED
        )

        # Expired (by the wall clock): refused by the TLS layer of both servers.
        expired_cert = stack.ca.sign(
            csr_pem(key, "car-b").encode(), "car-b", now - timedelta(days=100)
        )
        expired = Identity("car-b", key_pem(key), expired_cert.pem, other.ca_certificate)
        assert _desired_call(stack.device_channel(expired), "car-b") == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert refused_handshake(
            stack.tls_port, expired.ssl_context(stack.pki.ca_cert, tmp_path / "expired")
        )

        # From another CA: refused by both.
        from ota.trust.device_ca import DeviceCa, generate_device_ca

        rogue_paths = generate_device_ca(tmp_path / "rogue", now=now)
        rogue = DeviceCa.load(rogue_paths.cert, rogue_paths.key)
        rogue_cert = rogue.sign(csr_pem(key, "car-a").encode(), "car-a", now)
        foreign = Identity("car-a", key_pem(key), rogue_cert.pem, rogue.pem)
        assert _desired_call(stack.device_channel(foreign), "car-a") == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert refused_handshake(
            stack.tls_port, foreign.ssl_context(stack.pki.ca_cert, tmp_path / "foreign")
        )
        channel.close()


def test_enrollment_refuses_a_wrong_or_spent_token(tmp_path: Path) -> None:
    with cert_stack(tmp_path) as stack:
        token = stack.register("car-t")["car-t"]
        with pytest.raises(grpc.RpcError) as wrong:
            enroll(stack.client.channel, "car-t", "not-the-token")
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        enroll(stack.client.channel, "car-t", token)
        with pytest.raises(grpc.RpcError) as spent:
            enroll(stack.client.channel, "car-t", token)
        assert spent.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A request for another name is refused, naming the field.
        other = stack.register("car-u")["car-u"]
        stub = stack.client.fleet
        with pytest.raises(grpc.RpcError) as named:
            stub.EnrollDevice(
                fleet_pb2.EnrollDeviceRequest(
                    device_id="car-u", enrollment_token=other, csr=csr_pem(new_key(), "car-t")
                ),
                timeout=30,
            )
        assert named.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "csr" in (named.value.details() or "")


def test_a_device_port_in_use_is_one_error_naming_device_listen(tmp_path: Path) -> None:
    with cert_stack(tmp_path) as stack:
        taken = f"127.0.0.1:{stack.plane.device_port}"
        second = dataclasses.replace(
            stack.plane.config, listen="127.0.0.1:0", device_listen=taken, device_crl_file=""
        )
        with pytest.raises(Unavailable) as refused:
            ControlPlane.build(second)
        assert refused.value.field == "device_listen"
        assert str(refused.value) == (
            f"device_listen: cannot listen on {taken}: the address is in use "
            "(another `ota serve`?) or not this machine's"
        )


@pytest.mark.postgres
def test_a_replica_with_nothing_of_the_brokers_registers_devices_that_connect(
    tmp_path: Path, postgres_database: str
) -> None:
    """Replica B shares only PostgreSQL with A: it enrolls a device, which then speaks to
    the broker and to A; B revokes it, and the broker and A refuse it at once."""
    with cert_stack(tmp_path, database_url=postgres_database, extra_control=(REPLICA_B,)) as stack:
        b = stack.replica(REPLICA_B)
        try:
            b_client = Client.connect(
                f"127.0.0.1:{b.port}", stack.token, ClientTls(ca_file=stack.pki.ca_cert)
            )
            token = (
                b_client.fleet.RegisterDevices(
                    fleet_pb2.RegisterDevicesRequest(
                        devices=[
                            fleet_pb2.DeviceRegistration(
                                device_id="car-r", model="ev6", region="eu", firmware="4.2.0"
                            )
                        ],
                        identity=fleet_pb2.DEVICE_IDENTITY_CERTIFICATE,
                    ),
                    metadata=b_client.metadata,
                )
                .credentials[0]
                .enrollment_token
            )
            identity = enroll(b_client.channel, "car-r", token)
            mqtt = stack.mqtt(identity, tmp_path / "car-r")
            mqtt.connect()
            assert mqtt.subscribe("ota/v1/devices/car-r/desired") == [1]
            on_a = stack.device_channel(identity)
            assert _desired_call(on_a, "car-r") == grpc.StatusCode.OK

            b_client.fleet.RevokeDevice(
                fleet_pb2.RevokeDeviceRequest(device_id="car-r"), metadata=b_client.metadata
            )
            assert _desired_call(on_a, "car-r") == grpc.StatusCode.UNAUTHENTICATED
            assert mqtt.disconnected.wait(30), "the broker kept the revoked device connected"
            mqtt.close()
            # Without a CRL on this broker the handshake succeeds, but the guard drops
            # the session at its first subscription.
            again = stack.mqtt(identity, tmp_path / "car-r-again")
            try:
                again.connect()
                again.client.subscribe("ota/v1/devices/car-r/desired", qos=1)
            except ConnectionError:
                pass
            assert again.disconnected.wait(30), "the revoked device stayed connected"
            again.close()
            on_a.close()
            b_client.channel.close()
        finally:
            b.stop()


def test_the_simulated_fleet_renews_its_certificates_and_reconnects(tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC) - timedelta(days=61))
    with cert_stack(tmp_path, clock=clock) as stack:
        fleet = SimulatedFleet(
            compose_fleet(2, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            stack.fleet_settings(tmp_path / "devices"),
            clock=clock,
        )
        fleet.start()
        try:
            ids = [d.device_id for d in fleet.devices]
            before = {d: _serial(stack, d) for d in ids}
            assert fleet.renew_due() == []
            clock.advance(timedelta(days=61))
            assert sorted(fleet.renew_due()) == sorted(ids)
            after = {d: _serial(stack, d) for d in ids}
            assert all(after[d] and after[d] != before[d] for d in ids)
            # Reconnected with the new certificate, and following again.
            for device_id in ids:
                assert fleet.device(device_id).connected.is_set()
            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert dict(final.device_states) == {"ACTIVE": 2}
        finally:
            fleet.stop()


def _serial(stack: object, device_id: str) -> str:
    client = stack.client  # type: ignore[attr-defined]
    device = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id), metadata=client.metadata
    ).device
    serial: str = device.certificate_serial
    return serial
