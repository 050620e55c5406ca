"""A private stack on one machine: keys, a Mosquitto broker, a control plane on SQLite.

Used by `ota dev`, `ota demo` and the end-to-end tests, so all three run the
same real parts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ota.app import ControlPlane, MosquittoAccounts
from ota.broker.config import BrokerFiles, BrokerSettings
from ota.broker.process import MosquittoProcess, free_port, start_private_broker
from ota.clock import Clock
from ota.config import ServerConfig
from ota.keyring import KeyPaths, generate_keyring
from ota.tls import ClientTls, DevPki, generate_dev_pki


@dataclass(frozen=True)
class BrokerEndpoint:
    """A broker somebody else runs, with the control plane's account on it."""

    host: str
    port: int
    control_username: str
    control_password: str
    password_file: Path | None = None
    pid_file: Path | None = None
    # How to make the broker re-read its accounts, when not by the pid file.
    reload: Callable[[], None] | None = None


@dataclass
class DevStack:
    state_dir: Path
    keys: KeyPaths
    broker: BrokerEndpoint
    control_plane: ControlPlane
    admin_token: str
    broker_process: MosquittoProcess | None = None
    # The development CA and certificates when the stack serves gRPC over TLS.
    pki: DevPki | None = None
    mtls: bool = False

    @property
    def client_tls(self) -> ClientTls | None:
        """What a client needs to reach this stack: None for plaintext."""
        if self.pki is None:
            return None
        if not self.mtls:
            return ClientTls(ca_file=self.pki.ca_cert)
        return ClientTls(self.pki.ca_cert, self.pki.client_cert, self.pki.client_key)

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.control_plane.port}"

    @property
    def metrics_url(self) -> str:
        address = self.control_plane.metrics_address
        return f"http://{address}/metrics" if address else ""

    @property
    def origin_url(self) -> str:
        return self.control_plane.origin_url

    @property
    def dashboard_url(self) -> str:
        return self.control_plane.dashboard_url

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.broker.host}:{self.broker.port}"

    @classmethod
    def start(
        cls,
        state_dir: Path,
        *,
        grpc_port: int = 0,
        broker: BrokerEndpoint | None = None,
        database_url: str | None = None,
        clock: Clock | None = None,
        config_overrides: dict[str, object] | None = None,
        tls: bool = False,
        mtls: bool = False,
        metrics_port: int | None = 0,
        origin: bool = False,
        dashboard_port: int | None = 0,
    ) -> DevStack:
        """With `tls`, gRPC is served over TLS from a development CA (made once under
        state_dir/tls); with `mtls` too, clients must present its client certificate."""
        state_dir = state_dir.resolve()
        state_dir.mkdir(parents=True, exist_ok=True)
        keys = KeyPaths.under(state_dir / "keys")
        if not keys.root_json.exists():
            generate_keyring(state_dir / "keys", clock=clock)
        process: MosquittoProcess | None = None
        if broker is None:
            password = secrets.token_urlsafe(24)
            process, files = start_private_broker(
                state_dir / "broker", control_password=password, settings=BrokerSettings(port=0)
            )
            broker = _endpoint(process, files, password)
        token_file = state_dir / "admin.token"
        if not token_file.exists():
            token_file.write_text(secrets.token_hex(24))  # never starts with "-"
            token_file.chmod(0o600)
        admin_token = token_file.read_text().strip()
        config = ServerConfig(
            listen=f"127.0.0.1:{grpc_port or free_port()}",
            database_url=database_url or f"sqlite:///{state_dir / 'ota.db'}",
            data_dir=state_dir / "data",
            mqtt_url=f"mqtt://{broker.host}:{broker.port}",
            mqtt_username=broker.control_username,
            mqtt_password=broker.control_password,
            broker_password_file=str(broker.password_file or ""),
            broker_pid_file=str(broker.pid_file or ""),
            root_file=keys.root_json,
            initial_targets_file=keys.targets_json,
            snapshot_key=keys.snapshot_key,
            timestamp_key=keys.timestamp_key,
            director_key=keys.director_key,
            tokens={admin_token: "admin"},
            # Prometheus metrics on loopback (0: any free port); None turns them off.
            metrics_listen="" if metrics_port is None else f"127.0.0.1:{metrics_port}",
            # The HTTP delivery origin on a free loopback port, when asked for.
            origin_listen="127.0.0.1:0" if origin else "",
            # The web dashboard on loopback (0: any free port); None turns it off.
            dashboard_listen="" if dashboard_port is None else f"127.0.0.1:{dashboard_port}",
        )
        pki = None
        if tls or mtls:
            pki = generate_dev_pki(state_dir / "tls")
            config = replace(
                config,
                tls_cert_file=str(pki.server_cert),
                tls_key_file=str(pki.server_key),
                tls_client_ca_file=str(pki.ca_cert) if mtls else "",
            )
        if config_overrides:
            config = replace(config, **config_overrides)  # type: ignore[arg-type]
        try:
            accounts = None
            if broker.reload is not None and broker.password_file is not None:
                accounts = MosquittoAccounts(broker.password_file, None, reload=broker.reload)
            control_plane = ControlPlane.build(config, clock, accounts=accounts)
            control_plane.start()
        except BaseException:
            if process is not None:
                process.stop()
            raise
        return cls(state_dir, keys, broker, control_plane, admin_token, process, pki, mtls)

    def env_lines(self) -> str:
        return (
            f"export OTA_SERVER={self.server}\n"
            f"export OTA_TOKEN={self.admin_token}\n"
            f"export OTA_MQTT_URL={self.mqtt_url}\n"
            f"export OTA_ROOT={self.keys.root_json}\n"
            + (f"export OTA_TLS_CA={self.pki.ca_cert}\n" if self.pki else "")
            + (
                f"export OTA_TLS_CERT={self.pki.client_cert}\n"
                f"export OTA_TLS_KEY={self.pki.client_key}\n"
                if self.pki and self.mtls
                else ""
            )
        )

    def stop(self) -> None:
        try:
            self.control_plane.stop()
        finally:
            if self.broker_process is not None:
                self.broker_process.stop()


def _endpoint(process: MosquittoProcess, files: BrokerFiles, password: str) -> BrokerEndpoint:
    return BrokerEndpoint(
        host=process.host,
        port=process.port,
        control_username="ota-control",
        control_password=password,
        password_file=files.password_file,
        pid_file=files.pid_file,
    )
