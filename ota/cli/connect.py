"""Connection flags every client command shares: server, token, TLS."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ota.client import Client
from ota.tls import ClientTls


def add_tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("OTA_TLS_CA", ""),
        help="connect over TLS, trusting this CA (PEM) (env OTA_TLS_CA)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        default=os.environ.get("OTA_TLS", "") in ("1", "true"),
        help="connect over TLS trusting the system CAs (env OTA_TLS=1)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("OTA_TLS_CERT", ""),
        help="client certificate (PEM) for mTLS (env OTA_TLS_CERT)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("OTA_TLS_KEY", ""),
        help="the client certificate's key (PEM) (env OTA_TLS_KEY)",
    )


def client_tls(args: argparse.Namespace) -> ClientTls | None:
    ca, cert, key = args.tls_ca, args.tls_cert, args.tls_key
    if not (args.tls or ca or cert or key):
        return None
    return ClientTls(
        ca_file=Path(ca) if ca else None,
        cert_file=Path(cert) if cert else None,
        key_file=Path(key) if key else None,
    )


def connect(args: argparse.Namespace) -> Client:
    return Client.connect(args.server, args.token, client_tls(args))
