"""The fleet's device CA: signs device certificates, lists revoked ones, checks peers.

A device makes its own key pair and sends a certificate signing request; the
CA names the device in the subject's common name (the device id), which a
broker's `use_identity_as_username` and the gRPC server both read. Keys are EC P-256: what Mosquitto's
OpenSSL, gRPC's BoringSSL and every cloud broker accept for client
certificates (docs/DECISIONS.md, "Device certificates").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota.clock import utc
from ota.errors import InvalidArgument, Unauthenticated

# A vehicle can stand for weeks: 90 days with renewal from day 60 leaves a
# month of slack, and bounds how long a stolen, unrevoked key is any use.
CERT_LIFETIME = timedelta(days=90)
# Certificates start a little in the past: device and broker clocks differ.
BACKDATE = timedelta(minutes=5)
# How long a CRL is valid: brokers refuse every client once it has lapsed, so
# the control plane re-issues it far more often (each revocation, each day).
CRL_VALIDITY = timedelta(days=7)


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    serial: str  # lower-case hex, as stored and as `serial_hex` returns
    not_after: datetime


@dataclass(frozen=True)
class PeerCertificate:
    device_id: str
    serial: str
    not_before: datetime
    not_after: datetime


def serial_hex(serial: int) -> str:
    return format(serial, "x")


@dataclass(frozen=True)
class DeviceCaPaths:
    cert: Path
    key: Path

    @classmethod
    def under(cls, directory: Path) -> DeviceCaPaths:
        d = Path(directory)
        return cls(d / "device-ca.pem", d / "device-ca.key")


class DeviceCa:
    """A CA certificate and its private key; signs device certificates and CRLs."""

    def __init__(
        self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, crl_url: str = ""
    ) -> None:
        self.cert = cert
        self._key = key
        # Brokers that fetch CRLs themselves (EMQX) find them here, in each certificate.
        self._crl_url = crl_url

    @classmethod
    def load(cls, cert_file: Path, key_file: Path, *, crl_url: str = "") -> DeviceCa:
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read the device CA at {exc.filename}: {exc.strerror}",
                field="device_ca_cert_file",
            ) from exc
        except ValueError as exc:
            raise InvalidArgument(
                f"the device CA files are not PEM: {exc}", field="device_ca_cert_file"
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument("the device CA key must be EC", field="device_ca_key_file")
        return cls(cert, key, crl_url=crl_url)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign(
        self, csr_pem: bytes, device_id: str, now: datetime, lifetime: timedelta = CERT_LIFETIME
    ) -> IssuedCertificate:
        """A client certificate for `device_id` over the CSR's key (its signature checked)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise InvalidArgument("is not a PEM certificate signing request", field="csr") from exc
        if not csr.is_signature_valid:
            raise InvalidArgument("its signature does not match its key", field="csr")
        public = csr.public_key()
        if not (isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"):
            raise InvalidArgument("the key must be EC P-256", field="csr")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if names and names[0].value != device_id:
            raise InvalidArgument(
                f"its common name {names[0].value!r} is not the device id {device_id!r}",
                field="csr",
            )
        start = utc(now) - BACKDATE
        not_after = utc(now) + lifetime
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        if self._crl_url:
            point = x509.DistributionPoint(
                [x509.UniformResourceIdentifier(self._crl_url)], None, None, None
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), False)
        cert = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(
            cert.public_bytes(serialization.Encoding.PEM), serial_hex(serial), not_after
        )

    def crl(self, revoked: list[tuple[str, datetime]], now: datetime) -> bytes:
        """A PEM CRL listing `(serial hex, revoked at)`, valid for `CRL_VALIDITY`."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(utc(now) - BACKDATE)
            .next_update(utc(now) + CRL_VALIDITY)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(utc(when))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    def peer(self, cert_pem: bytes) -> PeerCertificate:
        """The device a presented certificate names, if this CA issued it for a client."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise Unauthenticated("the client certificate is not a device certificate") from exc
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise Unauthenticated("the client certificate names no device")
        return PeerCertificate(
            str(names[0].value),
            serial_hex(cert.serial_number),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )


def generate_device_ca(
    directory: Path, *, now: datetime, valid_for: timedelta = timedelta(days=3650)
) -> DeviceCaPaths:
    """A new device CA in `directory` (refuses to overwrite one)."""
    paths = DeviceCaPaths.under(directory)
    if paths.cert.exists() or paths.key.exists():
        raise InvalidArgument(f"{paths.cert} already exists", field="directory")
    Path(directory).mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ota device CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(utc(now) - BACKDATE)
        .not_valid_after(utc(now) + valid_for)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(paths.key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths
