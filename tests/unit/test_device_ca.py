"""The device CA: what it signs, what it refuses, its CRL, and which peers it recognises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota.device.enroll import Identity, csr_pem, key_pem, new_key
from ota.errors import InvalidArgument, Unauthenticated
from ota.trust.device_ca import CERT_LIFETIME, DeviceCa, generate_device_ca

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _ca(tmp_path: Path, name: str = "ca", crl_url: str = "") -> DeviceCa:
    paths = generate_device_ca(tmp_path / name, now=NOW)
    assert paths.key.stat().st_mode & 0o777 == 0o600
    return DeviceCa.load(paths.cert, paths.key, crl_url=crl_url)


def test_a_certificate_names_the_device_for_client_auth_only(tmp_path: Path) -> None:
    ca = _ca(tmp_path, crl_url="https://crl.example/device-ca.crl")
    key = new_key()
    issued = ca.sign(csr_pem(key, "car-1").encode(), "car-1", NOW)
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "car-1"
    assert cert.not_valid_after_utc == NOW + CERT_LIFETIME
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert points[0].full_name[0].value == "https://crl.example/device-ca.crl"  # type: ignore[index]
    identity = Identity("car-1", key_pem(key), issued.pem, ca.pem)
    assert identity.serial == issued.serial
    assert not identity.due(NOW + timedelta(days=59))
    assert identity.due(NOW + timedelta(days=61))
    peer = ca.peer(issued.pem)
    assert (peer.device_id, peer.serial) == ("car-1", issued.serial)


def test_it_refuses_another_name_a_bad_signature_and_other_key_types(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    with pytest.raises(InvalidArgument, match="common name"):
        ca.sign(csr_pem(new_key(), "car-2").encode(), "car-1", NOW)
    with pytest.raises(InvalidArgument, match="PEM"):
        ca.sign(b"not a csr", "car-1", NOW)
    ed = ed25519.Ed25519PrivateKey.generate()
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "car-1")]))
        .sign(ed, None)
    )
    with pytest.raises(InvalidArgument, match="P-256"):
        ca.sign(request.public_bytes(serialization.Encoding.PEM), "car-1", NOW)


def test_the_crl_lists_the_refused_serials(tmp_path: Path) -> None:
    ca = _ca(tmp_path)
    issued = ca.sign(csr_pem(new_key(), "car-1").encode(), "car-1", NOW)
    crl = x509.load_pem_x509_crl(ca.crl([(issued.serial, NOW)], NOW))
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None
    assert crl.next_update_utc is not None and crl.next_update_utc > NOW


def test_a_certificate_of_another_ca_is_not_a_device(tmp_path: Path) -> None:
    ca, rogue = _ca(tmp_path), _ca(tmp_path, "rogue")
    foreign = rogue.sign(csr_pem(new_key(), "car-1").encode(), "car-1", NOW)
    with pytest.raises(Unauthenticated):
        ca.peer(foreign.pem)


def test_an_existing_ca_is_never_overwritten(tmp_path: Path) -> None:
    _ca(tmp_path)
    with pytest.raises(InvalidArgument, match="already exists"):
        generate_device_ca(tmp_path / "ca", now=NOW)


def test_ota_keys_device_ca_writes_a_first_crl_a_broker_can_start_with(tmp_path: Path) -> None:
    from ota.cli.main import main as ota_main

    assert ota_main(["keys", "device-ca", "--out", str(tmp_path / "ca")]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca" / "device-ca.pem").read_bytes())
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "device-ca.crl").read_bytes())
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca.subject
    assert len(crl) == 0
    assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)
