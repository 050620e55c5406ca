"""device-identity: register and enroll N certificate devices, against N password devices.

Figure: seconds to register N devices with IDENTITY_CERTIFICATE (batches of
10 000) and have each enroll: make an EC P-256 key, send a CSR with its
one-time token, get its certificate (8 devices at a time, as a factory line
or a fleet coming online would, over one TLS channel). The broker's RSS is
read before and after: certificate devices cost it nothing until they connect.

Baseline: the same N registered with IDENTITY_PASSWORD in the same run on the
same control plane: every batch rewrites the broker's password file and
reloads the broker (SIGHUP, synchronous), whose RSS and file size grow.

Both control planes run in this process on SQLite, with a private Mosquitto.
Then `connected` devices of each kind hold a connection at once (certificate
devices over mutual TLS on the certificate listener, password devices over
plain TCP) and the broker's RSS growth per connection is recorded: the
figure the 1 M / 10 M arithmetic in docs/PERFORMANCE.md builds on.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import Figure, Result, Target, log, ratio, rss_kib, start_broker
from ota.app import ControlPlane, MosquittoAccounts
from ota.broker.process import free_port, raise_open_files_limit
from ota.client import Client
from ota.config import ServerConfig
from ota.device.enroll import enroll
from ota.keyring import generate_keyring
from ota.tls import ClientTls, generate_dev_pki
from ota.trust.device_ca import generate_device_ca
from ota.v1 import fleet_pb2

BATCH = 10_000
ENROLLERS = 8
CONNECTED = 2_000


def _connect_packet(client_id: str, username: str = "", password: str = "") -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 600 s)."""

    def text(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)
    body = text("MQTT") + bytes([4, flags]) + (600).to_bytes(2, "big") + text(client_id)
    if username:
        body += text(username)
    if password:
        body += text(password)
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + encoded + body


def _hold_connections(
    port: int, clients: list[tuple[str, str, str]], context: ssl.SSLContext | None = None
) -> list[socket.socket]:
    """Connect each (client id, username, password); returns the open sockets."""
    held: list[socket.socket] = []
    for client_id, username, password in clients:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        sock.sendall(_connect_packet(client_id, username, password))
        connack = sock.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"{client_id}: the broker refused the connection ({connack!r})")
        held.append(sock)
    return held


def _register(client: Client, ids: list[str], identity: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(0, len(ids), BATCH):
        response = client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=d, model="ev6", region="eu", firmware="4.2.0"
                    )
                    for d in ids[i : i + BATCH]
                ],
                identity=identity,  # type: ignore[arg-type]
            ),
            metadata=client.metadata,
            timeout=600,
        )
        out.update({c.device_id: c.enrollment_token or c.secret for c in response.credentials})
    return out


def run(quick: bool, devices: int | None = None) -> Result:
    n = devices or (300 if quick else 100_000)
    with tempfile.TemporaryDirectory(prefix="ota-bench-identity-") as tmp:
        root = Path(tmp)
        pki = generate_dev_pki(root / "tls")
        ca = generate_device_ca(root / "device-ca", now=datetime.now(UTC))
        tls_port = free_port("127.0.0.1")
        broker = start_broker(
            root / "broker",
            tls_port=tls_port,
            tls_cafile=str(ca.cert),
            tls_certfile=str(pki.server_cert),
            tls_keyfile=str(pki.server_key),
            tls_require_certificate=True,
        )
        try:
            keys = generate_keyring(root / "keys")
            token = secrets.token_hex(16)
            config = ServerConfig(
                listen="127.0.0.1:0",
                database_url=f"sqlite:///{root / 'ota.db'}",
                data_dir=root / "data",
                mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                mqtt_password=broker.control_password,
                root_file=keys.root_json,
                initial_targets_file=keys.targets_json,
                snapshot_key=keys.snapshot_key,
                timestamp_key=keys.timestamp_key,
                director_key=keys.director_key,
                tokens={token: "admin"},
                tls_cert_file=str(pki.server_cert),
                tls_key_file=str(pki.server_key),
                device_ca_cert_file=str(ca.cert),
                device_ca_key_file=str(ca.key),
            )
            accounts = MosquittoAccounts(
                broker.files.password_file, None, reload=broker.process.reload
            )
            plane = ControlPlane.build(config, accounts=accounts)
            plane.start()
            client = Client.connect(
                f"127.0.0.1:{plane.port}", token, ClientTls(ca_file=pki.ca_cert)
            )
            try:
                out = _measure(
                    client,
                    broker,
                    n,
                    tls_port=tls_port,
                    server_ca=pki.ca_cert,
                    connected=min(n, 300 if quick else CONNECTED),
                    scratch=root / "identities",
                )
            finally:
                client.channel.close()
                plane.stop()
        finally:
            broker.stop()
    figure = out["certificate"]["total_s"]
    baseline = out["password"]["register_s"]
    return Result(
        name="device-identity",
        mode="quick" if quick else "full",
        figure=Figure(figure, "s", f"register + enroll {n:,} certificate devices"),
        baseline=Figure(baseline, "s", f"register {n:,} password devices (password file)"),
        ratio=ratio(figure, baseline),
        targets=[
            Target(
                "certificate devices cost the broker no memory before they connect",
                out["certificate"]["broker_rss_growth_kib"] < 1024,
                f"{out['certificate']['broker_rss_growth_kib']} KiB",
            )
        ],
        details={"devices": n, **out},
    )


def _measure(
    client: Client,
    broker: Any,
    n: int,
    *,
    tls_port: int,
    server_ca: Path,
    connected: int,
    scratch: Path,
) -> dict[str, Any]:
    pid = broker.process.pid
    cert_ids = [f"cert-{i:07d}" for i in range(n)]
    pw_ids = [f"pw-{i:07d}" for i in range(n)]

    rss0 = rss_kib(pid)
    t0 = time.perf_counter()
    tokens = _register(client, cert_ids, fleet_pb2.DEVICE_IDENTITY_CERTIFICATE)
    t1 = time.perf_counter()
    log(f"registered {n:,} certificate devices in {t1 - t0:.1f} s")
    with ThreadPoolExecutor(ENROLLERS) as pool:
        identities = list(
            pool.map(lambda d: enroll(client.channel, d, tokens[d], timeout=120), cert_ids)
        )
    t2 = time.perf_counter()
    assert len({i.serial for i in identities}) == n
    rss1 = rss_kib(pid)
    log(f"enrolled them in {t2 - t1:.1f} s ({n / (t2 - t1):,.0f}/s)")
    cert = {
        "register_s": t1 - t0,
        "enroll_s": t2 - t1,
        "total_s": t2 - t0,
        "enroll_per_s": n / (t2 - t1),
        "broker_rss_growth_kib": rss1 - rss0,
    }

    t3 = time.perf_counter()
    secrets_by_id = _register(client, pw_ids, fleet_pb2.DEVICE_IDENTITY_PASSWORD)
    t4 = time.perf_counter()
    rss2 = rss_kib(pid)
    log(f"registered {n:,} password devices in {t4 - t3:.1f} s")
    password = {
        "register_s": t4 - t3,
        "register_per_s": n / (t4 - t3),
        "broker_rss_growth_kib": rss2 - rss1,
        "password_file_bytes": broker.files.password_file.stat().st_size,
    }

    # Connections: the broker's memory per device it holds, of each kind.
    raise_open_files_limit(os.getpid(), 2 * connected + 256)
    before = rss_kib(pid)
    held: list[socket.socket] = []
    t5 = time.perf_counter()
    for identity in identities[:connected]:
        context = identity.ssl_context(server_ca, scratch / identity.device_id)
        held += _hold_connections(tls_port, [(identity.device_id, "", "")], context)
    t6 = time.perf_counter()
    tls_rss = rss_kib(pid)
    held += _hold_connections(broker.port, [(d, d, secrets_by_id[d]) for d in pw_ids[:connected]])
    t7 = time.perf_counter()
    plain_rss = rss_kib(pid)
    for sock in held:
        sock.close()
    cert["connected"] = connected
    cert["connect_per_s"] = connected / (t6 - t5)
    cert["broker_kib_per_connection"] = (tls_rss - before) / connected
    password["connected"] = connected
    password["connect_per_s"] = connected / (t7 - t6)
    password["broker_kib_per_connection"] = (plain_rss - tls_rss) / connected
    log(
        f"broker: {cert['broker_kib_per_connection']:.1f} KiB per mutual-TLS connection, "
        f"{password['broker_kib_per_connection']:.1f} KiB per password connection "
        f"({connected:,} of each held)"
    )
    return {"certificate": cert, "password": password}
