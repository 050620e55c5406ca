"""A device's own identity: its key pair, enrollment and certificate renewal.

The device makes an EC P-256 key and never lets the private half out; it
sends a certificate signing request with the one-time token `ota fleet
register --identity certificate` printed (or has an operator sign the request
at the factory, `ota fleet sign-csr`), and gets a certificate naming its
device id. From then on it speaks mutual TLS to the broker and to the
control plane's device port, and renews over that connection once two thirds
of the lifetime have passed: a new key, a new request, the old certificate
refused from then on.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import grpc
import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ota.clock import utc
from ota.v1 import fleet_pb2, fleet_pb2_grpc

# A certificate is renewed once this share of its lifetime has passed (the
# control plane names the same moment as `renew_time` when it issues one).
RENEW_AFTER_FRACTION = 2 / 3


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8, what gRPC core and OpenSSL (Mosquitto, paho) both read.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    """A signing request for `key`, naming `device_id` as its common name."""
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


@dataclass(frozen=True)
class Identity:
    """A device's key and certificate (PEM), and the CA that signed the certificate."""

    device_id: str
    key: bytes
    certificate: bytes
    ca_certificate: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate)

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")

    def renew_at(self) -> datetime:
        cert = self.cert
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        return start + (end - start) * RENEW_AFTER_FRACTION

    def due(self, now: datetime) -> bool:
        """Whether the certificate is two thirds through its lifetime (or past)."""
        return utc(now) >= self.renew_at()

    def grpc_credentials(self, server_ca: bytes | None) -> grpc.ChannelCredentials:
        """mTLS to the control plane's device port; `server_ca` checks its certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=server_ca, private_key=self.key, certificate_chain=self.certificate
        )

    def ssl_context(self, server_ca_file: Path | None, directory: Path) -> ssl.SSLContext:
        """mTLS to the broker; the key and certificate are written to `directory` (0600)."""
        context = ssl.create_default_context(cafile=str(server_ca_file) if server_ca_file else None)
        key_file, cert_file = self.save(directory)
        context.load_cert_chain(cert_file, key_file)
        return context

    def http_pool(
        self, server_ca_file: Path | None, directory: Path, *, maxsize: int = 2
    ) -> urllib3.PoolManager:
        """mTLS to the delivery origin (`HttpSource`'s pool); `server_ca_file` checks the
        origin's certificate (None: the system's CAs)."""
        return urllib3.PoolManager(
            maxsize=maxsize, ssl_context=self.ssl_context(server_ca_file, directory)
        )

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write key.pem (0600) and cert.pem into `directory`; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = directory / "key.pem", directory / "cert.pem"
        _write(key_file, self.key, private=True)
        _write(cert_file, self.certificate)
        _write(directory / "device-ca.pem", self.ca_certificate)
        return key_file, cert_file

    @classmethod
    def load(cls, directory: Path, device_id: str) -> Identity:
        return cls(
            device_id,
            (directory / "key.pem").read_bytes(),
            (directory / "cert.pem").read_bytes(),
            (directory / "device-ca.pem").read_bytes(),
        )


def enroll(channel: grpc.Channel, device_id: str, token: str, *, timeout: float = 30) -> Identity:
    """Exchange the one-time enrollment token and a new key's CSR for a certificate."""
    key = new_key()
    stub = fleet_pb2_grpc.FleetServiceStub(channel)
    answer = stub.EnrollDevice(
        fleet_pb2.EnrollDeviceRequest(
            device_id=device_id, enrollment_token=token, csr=csr_pem(key, device_id)
        ),
        timeout=timeout,
    )
    return _identity(device_id, key, answer)


def renew(device_channel: grpc.Channel, device_id: str, *, timeout: float = 30) -> Identity:
    """A new key and certificate, asked for over the mTLS channel of the current one."""
    key = new_key()
    stub = fleet_pb2_grpc.FleetServiceStub(device_channel)
    answer = stub.RenewCertificate(
        fleet_pb2.RenewCertificateRequest(device_id=device_id, csr=csr_pem(key, device_id)),
        timeout=timeout,
    )
    return _identity(device_id, key, answer)


def _identity(
    device_id: str, key: ec.EllipticCurvePrivateKey, answer: fleet_pb2.DeviceCertificate
) -> Identity:
    return Identity(
        device_id, key_pem(key), answer.certificate.encode(), answer.ca_certificate.encode()
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    try:
        if path.read_bytes() == data:
            return  # already there (a restart): the key file is not written again for nothing
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
