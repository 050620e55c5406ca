"""TLS for gRPC and MQTT: credentials from PEM files, and a local CA for development.

Production certificates come from the operator's own PKI; `generate_dev_pki`
makes a throwaway CA with one server and one client certificate so that
`ota dev --tls` and the tests run the same TLS and mTLS paths as production.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ota.errors import InvalidArgument


def read_pem(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field=what) from exc


@dataclass(frozen=True)
class ServerTls:
    """The gRPC server's certificate; with `client_ca`, clients must present one it signed."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        client_ca = (
            read_pem(self.client_ca_file, "tls_client_ca_file") if self.client_ca_file else None
        )
        return grpc.ssl_server_credentials(
            [(read_pem(self.key_file, "tls_key_file"), read_pem(self.cert_file, "tls_cert_file"))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


@dataclass(frozen=True)
class ClientTls:
    """How a client checks the server (`ca_file`) and, for mTLS, proves itself (cert, key)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument(
                "a client certificate needs its key and the other way round", field="tls_cert"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca_file, "tls_ca") if self.ca_file else None,
            private_key=read_pem(self.key_file, "tls_key") if self.key_file else None,
            certificate_chain=read_pem(self.cert_file, "tls_cert") if self.cert_file else None,
        )


# gRPC's reconnect backoff grows to two minutes by default: a client that lost a
# restarting control plane (a watch, say) would stay disconnected that long after
# it is back. Callers back off themselves; the channel need only try again soon.
# (Not grpc.min_reconnect_backoff_ms: that is the connect timeout, 20 s by default.)
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def channel(server: str, tls: ClientTls | None) -> grpc.Channel:
    """A channel to `server`: TLS when `tls` is given, plaintext otherwise."""
    if tls is None:
        return grpc.insecure_channel(server, options=CHANNEL_OPTIONS)
    return grpc.secure_channel(server, tls.credentials(), options=CHANNEL_OPTIONS)


@dataclass(frozen=True)
class DevPki:
    """Files of a development CA: PEM certificates, keys mode 0600."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def under(cls, directory: Path) -> DevPki:
        d = Path(directory)
        return cls(
            d / "ca.pem",
            d / "ca.key",
            d / "server.pem",
            d / "server.key",
            d / "client.pem",
            d / "client.key",
        )


def generate_dev_pki(
    directory: Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    client_name: str = "ota-operator",
    valid_for: timedelta = timedelta(days=365),
) -> DevPki:
    """A CA, a server certificate for `hosts` and a client certificate; kept if present."""
    pki = DevPki.under(directory)
    if all(p.exists() for p in (pki.ca_cert, pki.server_cert, pki.client_cert)):
        return pki
    Path(directory).mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=5)  # tolerate a little clock skew
    until = now + valid_for
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ota development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier, names: list[x509.GeneralName]
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
            )
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, _san(hosts))
    client_key, client_cert = leaf(client_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    _write(pki.ca_key, _key_pem(ca_key), private=True)
    _write(pki.server_key, _key_pem(server_key), private=True)
    _write(pki.client_key, _key_pem(client_key), private=True)
    _write(pki.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(pki.client_cert, client_cert.public_bytes(serialization.Encoding.PEM))
    _write(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))  # last: marks done
    return pki


def _san(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8 unencrypted: what gRPC core and Mosquitto's OpenSSL both read.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
