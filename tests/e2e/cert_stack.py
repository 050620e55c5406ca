"""A control plane, a broker with a mutual-TLS listener and a device CA, for certificate tests.

The control plane is given nothing of the broker's but its address and its
own account: no password file, no pid file (unless `crl` asks it to keep the
broker's CRL, as a control plane on the broker's host may).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_sim.fleet import FleetSettings
from device_sim.profile import FailureProfile
from ota.app import ControlPlane
from ota.broker import (
    BrokerSettings,
    MosquittoProcess,
    PasswordFile,
    generate_secret,
    start_private_broker,
)
from ota.broker.config import BrokerFiles, broker_files
from ota.broker.process import free_port
from ota.client import Client
from ota.clock import Clock
from ota.config import ServerConfig
from ota.device.enroll import Identity, enroll
from ota.keyring import KeyPaths, generate_keyring
from ota.tls import ClientTls, DevPki, generate_dev_pki
from ota.trust.device_ca import DeviceCa, DeviceCaPaths, generate_device_ca
from ota.v1 import fleet_pb2

TIMEOUT = 30.0


@dataclass
class CertStack:
    broker: MosquittoProcess
    files: BrokerFiles
    plane: ControlPlane
    client: Client
    keys: KeyPaths
    pki: DevPki
    ca_paths: DeviceCaPaths
    tls_port: int
    token: str
    crl_file: Path
    # Starts another control plane on the same database under a broker account
    # of its own, with none of the broker's files (the caller stops it).
    replica: Callable[[str], ControlPlane]

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.plane.port}"

    @property
    def origin_url(self) -> str:
        """The delivery origin (HTTPS; device certificates required unless
        `origin_devices=False`), with `origin=True`."""
        return self.plane.origin_url

    @property
    def device_server(self) -> str:
        return f"127.0.0.1:{self.plane.device_port}"

    @property
    def ca(self) -> DeviceCa:
        return DeviceCa.load(self.ca_paths.cert, self.ca_paths.key)

    def register(self, *device_ids: str) -> dict[str, str]:
        """Register certificate devices; their one-time enrollment tokens."""
        response = self.client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=d, model="ev6", region="eu", firmware="4.2.0"
                    )
                    for d in device_ids
                ],
                identity=fleet_pb2.DEVICE_IDENTITY_CERTIFICATE,
            ),
            metadata=self.client.metadata,
            timeout=TIMEOUT,
        )
        return {c.device_id: c.enrollment_token for c in response.credentials}

    def enroll(self, device_id: str) -> Identity:
        token = self.register(device_id)[device_id]
        return enroll(self.client.channel, device_id, token)

    def device_channel(self, identity: Identity) -> grpc.Channel:
        return grpc.secure_channel(
            self.device_server, identity.grpc_credentials(self.pki.ca_cert.read_bytes())
        )

    def fleet_settings(self, state_dir: Path, *, origin_url: str = "") -> FleetSettings:
        """Simulated certificate devices of this stack: gRPC on the device port, and
        HTTP delivery from `origin_url` (the origin or a cache) when given."""
        return FleetSettings(
            server=self.server,
            admin_token=self.token,
            trusted_root=self.keys.root_json.read_bytes(),
            state_dir=state_dir,
            failures=FailureProfile.parse([]),
            identity="cert",
            device_server=self.device_server,
            server_ca=self.pki.ca_cert,
            delivery="http" if origin_url else "grpc",
            origin_url=origin_url,
            origin_ca=self.pki.ca_cert if origin_url else None,
        )

    def mqtt(self, identity: Identity, directory: Path) -> DeviceMqtt:
        return DeviceMqtt(self.tls_port, identity.ssl_context(self.pki.ca_cert, directory))


class DeviceMqtt:
    """A blocking MQTT 5 client over mutual TLS; every wait is bounded."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.port = port
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.tls_set_context(context)
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subacks: list[int] = []
        self._suback = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, *args: object) -> None:
        reason = args[3]
        if not getattr(reason, "is_failure", False):
            self.connected.set()

    def _on_disconnect(self, *args: object) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(
        self, _c: object, _u: object, _mid: int, codes: list[object], _p: object
    ) -> None:
        self.subacks = [int(getattr(c, "value", c)) for c in codes]  # type: ignore[call-overload]
        self._suback.set()

    def connect(self) -> None:
        """Connect and wait for the CONNACK; raises if the broker refuses (TLS or MQTT)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(TIMEOUT):
            self.client.loop_stop()
            raise ConnectionError("no successful CONNACK")

    def subscribe(self, topic: str) -> list[int]:
        self._suback.clear()
        self.client.subscribe(topic, qos=1)
        assert self._suback.wait(TIMEOUT), "no SUBACK"
        return self.subacks

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def refused_handshake(port: int, context: ssl.SSLContext) -> bool:
    """True if the broker ends the TLS handshake or the session before a CONNACK."""
    probe = DeviceMqtt(port, context)
    try:
        probe.client.connect("127.0.0.1", port, keepalive=30)
    except (ssl.SSLError, OSError):
        return True
    probe.client.loop_start()
    try:
        return not probe.connected.wait(10) or probe.disconnected.is_set()
    finally:
        probe.client.loop_stop()


@contextlib.contextmanager
def cert_stack(
    tmp_path: Path,
    *,
    clock: Clock | None = None,
    crl: bool = False,
    database_url: str = "",
    extra_control: tuple[str, ...] = (),
    origin: bool = False,
    origin_devices: bool = True,
    origin_token: str = "",
) -> Iterator[CertStack]:
    keys = generate_keyring(tmp_path / "keys")
    pki = generate_dev_pki(tmp_path / "tls")
    ca_paths = generate_device_ca(tmp_path / "device-ca", now=datetime.now(UTC))
    ca = DeviceCa.load(ca_paths.cert, ca_paths.key)
    crl_file = tmp_path / "device-ca.crl"
    crl_file.write_bytes(ca.crl([], datetime.now(UTC)))
    tls_port = free_port("127.0.0.1")
    settings = BrokerSettings(
        port=0,
        tls_port=tls_port,
        tls_cafile=str(ca_paths.cert),
        tls_certfile=str(pki.server_cert),
        tls_keyfile=str(pki.server_key),
        tls_require_certificate=True,
        tls_crlfile=str(crl_file),
        extra_control_usernames=extra_control,
    )
    control_password = generate_secret()
    # The replicas' broker accounts: set once by whoever runs the broker, here
    # before it starts (a SIGHUP during its start-up would end it).
    replica_passwords = {name: generate_secret() for name in extra_control}
    (tmp_path / "broker").mkdir()
    PasswordFile(broker_files(tmp_path / "broker").password_file).set_many(replica_passwords)
    broker, files = start_private_broker(
        tmp_path / "broker", control_password=control_password, settings=settings
    )
    token = os.urandom(24).hex()
    try:
        config = ServerConfig(
            listen="127.0.0.1:0",
            database_url=database_url or f"sqlite:///{tmp_path / 'ota.db'}",
            data_dir=tmp_path / "data",
            mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
            mqtt_username=settings.control_username,
            mqtt_password=control_password,
            root_file=keys.root_json,
            initial_targets_file=keys.targets_json,
            snapshot_key=keys.snapshot_key,
            timestamp_key=keys.timestamp_key,
            director_key=keys.director_key,
            tokens={token: "admin"},
            tls_cert_file=str(pki.server_cert),
            tls_key_file=str(pki.server_key),
            device_ca_cert_file=str(ca_paths.cert),
            device_ca_key_file=str(ca_paths.key),
            device_listen="127.0.0.1:0",
            device_mqtt_url=f"mqtts://127.0.0.1:{tls_port}",
            device_crl_file=str(crl_file) if crl else "",
            broker_pid_file=str(files.pid_file) if crl else "",
            engine_interval_seconds=0.1,
        )
        if origin:
            config = dataclasses.replace(
                config,
                origin_listen="127.0.0.1:0",
                origin_tls_cert_file=str(pki.server_cert),
                origin_tls_key_file=str(pki.server_key),
                origin_device_certificates=origin_devices,
                origin_token=origin_token,
            )
        plane = ControlPlane.build(config, clock)
        plane.start()

        def replica(name: str) -> ControlPlane:
            other = ControlPlane.build(
                dataclasses.replace(
                    config,
                    mqtt_username=name,
                    mqtt_password=replica_passwords[name],
                    device_crl_file="",
                    broker_pid_file="",
                ),
                clock,
            )
            other.start()
            return other

        client = Client.connect(plane_address(plane), token, ClientTls(ca_file=pki.ca_cert))
        try:
            yield CertStack(
                broker,
                files,
                plane,
                client,
                keys,
                pki,
                ca_paths,
                tls_port,
                token,
                crl_file,
                replica,
            )
        finally:
            client.channel.close()
            plane.stop()
    finally:
        broker.stop()


def plane_address(plane: ControlPlane) -> str:
    return f"127.0.0.1:{plane.port}"
