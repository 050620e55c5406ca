"""HTTP delivery over mutual TLS: the origin demands a device certificate and checks it per request.

A real Mosquitto with a certificate listener, the control plane on real ports
(gRPC, the device port and the HTTPS origin, `origin_device_certificates`),
SQLite or PostgreSQL. Devices fetch TUF metadata and bundles from the origin
with the certificate they use for MQTT and gRPC; or, through a private nginx
(Debian's) running `ota repo nginx`'s configuration, which ends their mutual
TLS against the device CA and its CRL and fetches from the origin with the
fleet's token.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import urllib3
from urllib3.exceptions import ProtocolError, SSLError

from device_sim.fleet import SimulatedFleet
from device_sim.profile import compose_fleet
from ota.clock import ManualClock
from ota.delivery.nginx import DeviceCacheSettings
from ota.device.enroll import Identity, csr_pem, key_pem, new_key
from ota.trust.device_ca import DeviceCa, generate_device_ca
from ota.v1 import fleet_pb2, rollout_pb2
from tests.cache_harness import private_nginx
from tests.e2e.cert_stack import CertStack, cert_stack
from tests.e2e.scenario import MODELS, REGIONS, publish, run_rollout, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 4


def _get(pool: urllib3.PoolManager, url: str) -> int:
    response = pool.request("GET", url, retries=False, timeout=30)
    return response.status


def _refused(stack: CertStack, context: ssl.SSLContext) -> bool:
    """True if the origin ends the TLS handshake (or the connection) without an answer."""
    pool = urllib3.PoolManager(ssl_context=context)
    try:
        _get(pool, f"{stack.origin_url}/metadata/timestamp.json")
    except (SSLError, ProtocolError):
        return True
    finally:
        pool.clear()
    return False


def _status(context: ssl.SSLContext, url: str) -> int:
    """The status a fresh connection gets (nginx completes the handshake of a client whose
    certificate it refuses, and answers 400)."""
    pool = urllib3.PoolManager(ssl_context=context)
    try:
        return _get(pool, url)
    finally:
        pool.clear()


def test_certificate_devices_follow_a_rollout_over_mutual_tls_http(
    tmp_path: Path, database_url: str
) -> None:
    with cert_stack(tmp_path, origin=True, database_url=database_url) as stack:
        assert stack.origin_url.startswith("https://")
        fleet = SimulatedFleet(
            compose_fleet(DEVICES, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            stack.fleet_settings(tmp_path / "devices", origin_url=stack.origin_url),
        )
        fleet.start()
        try:
            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
            assert dict(final.device_states) == {"ACTIVE": DEVICES}
        finally:
            fleet.stop()
        metrics = stack.plane.origin.metrics  # type: ignore[union-attr]
        # The bytes came over HTTP, from the origin, and nobody was refused.
        assert metrics.count("bundle", 200) >= DEVICES
        assert metrics.count("other", 403) == 0


def test_renewed_devices_fetch_with_their_new_certificate(tmp_path: Path) -> None:
    # As in test_device_certificates: the control plane's clock starts 61 days back,
    # so the first certificates are due once it moves on, while the TLS layers,
    # which go by the wall clock, accept them all.
    clock = ManualClock(datetime.now(UTC) - timedelta(days=61))
    with cert_stack(tmp_path, clock=clock, origin=True) as stack:
        fleet = SimulatedFleet(
            compose_fleet(2, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            stack.fleet_settings(tmp_path / "devices", origin_url=stack.origin_url),
            clock=clock,
        )
        fleet.start()
        try:
            clock.advance(timedelta(days=61))
            assert len(fleet.renew_due()) == 2
            # The old certificates are refused from now on, so a rollout that completes
            # was fetched with the new ones.
            publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
            final = run_rollout(stack.client, "1.0.0", [1_000_000])
            assert dict(final.device_states) == {"ACTIVE": 2}
        finally:
            fleet.stop()
        metrics = stack.plane.origin.metrics  # type: ignore[union-attr]
        assert metrics.count("bundle", 200) >= 2
        assert metrics.count("other", 403) == 0


def test_no_foreign_or_expired_certificate_gets_through(tmp_path: Path) -> None:
    with cert_stack(tmp_path, origin=True) as stack:
        url = f"{stack.origin_url}/metadata/timestamp.json"
        own = stack.enroll("car-a")
        pool = own.http_pool(stack.pki.ca_cert, tmp_path / "car-a")
        assert _get(pool, url) == 200
        pool.clear()

        # No certificate at all.
        plain = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
        assert _refused(stack, plain)

        key = new_key()
        now = datetime.now(UTC)
        # Another CA's certificate, naming a registered device.
        rogue_paths = generate_device_ca(tmp_path / "rogue", now=now)
        rogue = DeviceCa.load(rogue_paths.cert, rogue_paths.key)
        foreign = Identity(
            "car-a",
            key_pem(key),
            rogue.sign(csr_pem(key, "car-a").encode(), "car-a", now).pem,
            rogue.pem,
        )
        assert _refused(stack, foreign.ssl_context(stack.pki.ca_cert, tmp_path / "foreign"))

        # The device CA's, but expired.
        expired = Identity(
            "car-a",
            key_pem(key),
            stack.ca.sign(csr_pem(key, "car-a").encode(), "car-a", now - timedelta(days=100)).pem,
            own.ca_certificate,
        )
        assert _refused(stack, expired.ssl_context(stack.pki.ca_cert, tmp_path / "expired"))

        # The device CA's and valid, but not the one recorded for the device: the TLS
        # layer lets it in, the per-request check refuses it.
        borrowed = Identity(
            "car-a",
            key_pem(key),
            stack.ca.sign(csr_pem(key, "car-a").encode(), "car-a", now).pem,
            own.ca_certificate,
        )
        pool = borrowed.http_pool(stack.pki.ca_cert, tmp_path / "borrowed")
        assert _get(pool, url) == 403
        pool.clear()


def test_a_revoked_device_is_refused_on_its_next_request_on_the_same_connection(
    tmp_path: Path,
) -> None:
    with cert_stack(tmp_path, origin=True) as stack:
        identity = stack.enroll("car-1")
        pool = identity.http_pool(stack.pki.ca_cert, tmp_path / "car-1", maxsize=1)
        url = f"{stack.origin_url}/metadata/1.root.json"
        first = pool.request("GET", url, retries=False, timeout=30)
        assert first.status == 200
        connection = pool.connection_from_url(url)

        stack.client.fleet.RevokeDevice(
            fleet_pb2.RevokeDeviceRequest(device_id="car-1"), metadata=stack.client.metadata
        )
        second = pool.request("GET", url, retries=False, timeout=30)
        assert second.status == 403
        assert b"current" in second.data
        # One TLS connection carried both requests: keep-alive let nothing through.
        assert connection.num_connections == 1
        assert connection.num_requests == 2
        pool.clear()


def test_through_a_cache_that_ends_the_devices_mutual_tls(tmp_path: Path) -> None:
    token = "fleet-delivery-token"
    with cert_stack(
        tmp_path, origin=True, origin_devices=False, origin_token=token, crl=True
    ) as stack:
        origin = stack.origin_url.removeprefix("https://")

        def settings(listen: str, cache_dir: Path) -> DeviceCacheSettings:
            return DeviceCacheSettings(
                listen=listen,
                server_cert=str(stack.pki.server_cert),
                server_key=str(stack.pki.server_key),
                device_ca=str(stack.ca_paths.cert),
                crl=str(stack.crl_file),
                origin=origin,
                origin_ca=str(stack.pki.ca_cert),
                origin_name="localhost",  # the development certificate's DNS name
                token=token,
                cache_dir=str(cache_dir),
            )

        with private_nginx(tmp_path / "nginx", settings) as cache:
            fleet = SimulatedFleet(
                compose_fleet(DEVICES, models=MODELS, regions=REGIONS, firmware="4.2.0"),
                stack.fleet_settings(tmp_path / "devices", origin_url=cache.url),
            )
            fleet.start()
            try:
                publish(stack.client, stack, tmp_path, "1.0.0")  # type: ignore[arg-type]
                final = run_rollout(stack.client, "1.0.0", [1_000_000])
                assert dict(final.device_states) == {"ACTIVE": DEVICES}, final.state_reason
            finally:
                fleet.stop()
            # One copy for the fleet: the origin served the bundle fewer times than
            # devices installed it.
            metrics = stack.plane.origin.metrics  # type: ignore[union-attr]
            assert 1 <= metrics.count("bundle", 200) < DEVICES

            # Strangers get nothing from the cache.
            url = f"{cache.url}/metadata/timestamp.json"
            plain = ssl.create_default_context(cafile=str(stack.pki.ca_cert))
            assert _status(plain, url) == 400
            key = new_key()
            now = datetime.now(UTC)
            rogue_paths = generate_device_ca(tmp_path / "rogue", now=now)
            rogue = DeviceCa.load(rogue_paths.cert, rogue_paths.key)
            foreign = Identity(
                "car-x",
                key_pem(key),
                rogue.sign(csr_pem(key, "car-x").encode(), "car-x", now).pem,
                rogue.pem,
            )
            assert _status(foreign.ssl_context(stack.pki.ca_cert, tmp_path / "foreign"), url) == 400

            # A revoked device: the control plane rewrites the CRL at once; nginx
            # refuses the device's next handshake once it has re-read it.
            revoked = stack.enroll("car-revoked")
            kept = stack.enroll("car-kept")
            for identity in (revoked, kept):
                pool = identity.http_pool(stack.pki.ca_cert, tmp_path / identity.device_id)
                assert _get(pool, url) == 200
                pool.clear()
            stack.client.fleet.RevokeDevice(
                fleet_pb2.RevokeDeviceRequest(device_id="car-revoked"),
                metadata=stack.client.metadata,
            )
            cache.reload()
            revoked_context = revoked.ssl_context(stack.pki.ca_cert, tmp_path / "car-revoked")
            wait_for(
                lambda: _status(revoked_context, url) == 400,
                what="the cache refusing the revoked device",
                timeout=30,
            )
            pool = kept.http_pool(stack.pki.ca_cert, tmp_path / "car-kept")
            assert _get(pool, url) == 200
            pool.clear()
