"""Configuration of the control plane: frozen values, read only by the CLI.

Sources, later ones winning: defaults, a TOML file (`ota serve --config`),
`OTA_*` environment variables, command-line flags. Nothing else in the
package reads the environment or files for settings.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ota.broker.config import MAX_PUBLISH_CONNECTIONS, PUBLISH_CONNECTIONS
from ota.delivery.purge import parse_cache_urls
from ota.errors import InvalidArgument
from ota.metrics import parse_listen


@dataclass(frozen=True)
class ServerConfig:
    """Everything `ota serve` needs."""

    listen: str = "127.0.0.1:50051"
    # No default: a server that quietly made ./ota.db would run a second control
    # plane beside the real one (and take over its broker session). `ota dev` and
    # `ota demo` put SQLite in their state directory.
    database_url: str = ""
    data_dir: Path = Path(".ota")
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str = "ota-control"
    mqtt_password: str = ""
    topic_root: str = "ota/v1"
    # Where the control plane keeps device broker accounts (Mosquitto password
    # file) and the broker's pid file to make it reload them; empty = unmanaged.
    broker_password_file: str = ""
    broker_pid_file: str = ""
    # The trust anchor and the online keys (never the release or root keys).
    root_file: Path = Path("keys/root.json")
    initial_targets_file: Path = Path("keys/targets.json")
    snapshot_key: Path = Path("keys/online/snapshot.pem")
    timestamp_key: Path = Path("keys/online/timestamp.pem")
    director_key: Path = Path("keys/online/director.pem")
    # Bootstrap bearer tokens: token -> "role" or "role:name" (role in TOKEN_ROLES).
    tokens: dict[str, str] = field(default_factory=dict)
    desired_state_ttl_seconds: int = 7 * 24 * 3600
    # The longest the engine waits between looks at running rollouts: commands,
    # ingested progress and lease changes wake it at once, a soak's end or a stage
    # deadline when due; this is for maintenance windows, desired states to renew
    # and what another replica committed.
    engine_interval_seconds: float = 2.0
    ingest_batch_size: int = 500
    ingest_max_payload_bytes: int = 64 * 1024
    # Messages per second one device may send (sustained, and in a burst) before
    # the excess is dropped as "rate_limited"; 0 turns the limit off.
    ingest_device_rate: float = 20.0
    ingest_device_burst: int = 1000
    # Ingest worker processes on the shared subscription, each with its own broker
    # account (`<mqtt_username>-ingest-N`, `ota broker-config --ingest-workers`);
    # 0 or 1: ingest in the control plane's own process.
    ingest_workers: int = 0
    # gRPC over TLS: the server's certificate chain and key (PEM); empty = plaintext.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # mTLS: clients must present a certificate this CA signed (bearer tokens still apply).
    tls_client_ca_file: str = ""
    # With an mqtts:// URL, the CA that signed the broker's certificate (empty = system CAs).
    mqtt_ca_file: str = ""
    # The device CA (`ota keys device-ca`): signs device certificates at enrollment.
    device_ca_cert_file: str = ""
    device_ca_key_file: str = ""
    # A second gRPC port for devices with certificates: mutual TLS against the
    # device CA, with the server certificate of tls_cert_file. Empty = none.
    device_listen: str = ""
    # The broker URL certificate devices are told at registration (its mutual-TLS
    # listener, e.g. mqtts://broker.example:8883); empty = mqtt_url.
    device_mqtt_url: str = ""
    # Where to keep the device CA's CRL for a broker on this host (rewritten, and
    # the broker of broker_pid_file signalled, on each change); empty = not kept.
    device_crl_file: str = ""
    # Written into each device certificate as its CRL distribution point, for
    # brokers that fetch the CRL themselves (EMQX); serve `ota fleet crl` there.
    device_crl_url: str = ""
    # List certificates a renewal replaced in the CRL too (until they expire).
    # Off for a fleet of millions, whose CRL would otherwise hold about half of
    # its devices: gRPC still refuses them, the broker until they expire.
    device_crl_superseded: bool = True
    # Prometheus metrics over HTTP, e.g. "127.0.0.1:9464"; empty = off.
    metrics_listen: str = ""
    # "text" for people, "json" (one object a line) for log collectors.
    log_format: str = "text"
    # The HTTP origin devices fetch TUF metadata and bundles from, meant to sit behind
    # an HTTP cache or CDN (docs/OPERATIONS.md), e.g. "0.0.0.0:8443"; empty = off.
    # HTTPS with its own certificate and key when set; else plain HTTP.
    origin_listen: str = ""
    origin_tls_cert_file: str = ""
    origin_tls_key_file: str = ""
    # Seconds caches may keep timestamp.json (the only URL that changes in place).
    origin_timestamp_max_age: int = 5
    # A fleet-wide delivery token devices send and the cache checks; empty = public.
    origin_token: str = ""
    # The origin demands a certificate of the device CA (device_ca_cert_file) and
    # checks on every request that it is the device's current one (needs origin TLS).
    origin_device_certificates: bool = False
    # Caches in front of the origin that accept PURGE from this host, as base URLs
    # ("http://cache-1:6081, http://cache-2:6081"): a root rotation purges the next
    # root's 404 and the timestamp from each. With any listed, caches keep that 404
    # origin_next_root_max_age seconds; with none, as long as the timestamp.
    origin_purge_urls: str = ""
    origin_next_root_max_age: int = 300
    # The read-only web dashboard, e.g. "0.0.0.0:8080"; empty = off. Over HTTPS with
    # its own certificate and key, or else with the gRPC ones (tls_cert_file) when set.
    dashboard_listen: str = ""
    dashboard_tls_cert_file: str = ""
    dashboard_tls_key_file: str = ""

    def __post_init__(self) -> None:
        for name, bound in BOUNDS.items():
            bound.check(name, getattr(self, name))
        if self.lease_renew_seconds >= self.lease_duration_seconds:
            raise InvalidArgument(
                f"must be shorter than lease_duration_seconds ({self.lease_duration_seconds:g}), "
                f"got {self.lease_renew_seconds:g}",
                field="lease_renew_seconds",
            )
        if self.webhook_retry_max_seconds < self.webhook_retry_base_seconds:
            raise InvalidArgument(
                f"must not be below webhook_retry_base_seconds "
                f"({self.webhook_retry_base_seconds:g}), got {self.webhook_retry_max_seconds:g}",
                field="webhook_retry_max_seconds",
            )
        parse_listen(self.listen, field="listen")
        for entry in self.tokens.values():
            role = entry.partition(":")[0]
            if role not in TOKEN_ROLES:
                # Never echo the token: the line ends up in logs.
                raise InvalidArgument(
                    f"a token's role {role!r} is not one of {', '.join(TOKEN_ROLES)} "
                    '(write "role" or "role:name")',
                    field="tokens",
                )
        if any(not token.strip() for token in self.tokens):
            raise InvalidArgument("a token must not be empty", field="tokens")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidArgument(
                "TLS needs both tls_cert_file and tls_key_file", field="tls_cert_file"
            )
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidArgument(
                "mTLS (tls_client_ca_file) needs TLS: set tls_cert_file and tls_key_file",
                field="tls_client_ca_file",
            )
        if self.metrics_listen:
            parse_listen(self.metrics_listen)
        if self.origin_listen:
            try:
                parse_listen(self.origin_listen)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"{self.origin_listen!r} is not host:port, e.g. 0.0.0.0:8443",
                    field="origin_listen",
                ) from exc
        if bool(self.origin_tls_cert_file) != bool(self.origin_tls_key_file):
            raise InvalidArgument(
                "origin TLS needs both origin_tls_cert_file and origin_tls_key_file",
                field="origin_tls_cert_file",
            )
        if self.origin_device_certificates and not (
            self.origin_tls_cert_file and self.device_ca_cert_file
        ):
            raise InvalidArgument(
                "origin_device_certificates needs origin TLS (origin_tls_cert_file) and the "
                "device CA (device_ca_cert_file)",
                field="origin_device_certificates",
            )
        parse_cache_urls(self.origin_purge_urls, field="origin_purge_urls")
        if self.dashboard_listen:
            try:
                parse_listen(self.dashboard_listen)
            except InvalidArgument as exc:
                raise InvalidArgument(
                    f"{self.dashboard_listen!r} is not host:port, e.g. 0.0.0.0:8080",
                    field="dashboard_listen",
                ) from exc
        if bool(self.dashboard_tls_cert_file) != bool(self.dashboard_tls_key_file):
            raise InvalidArgument(
                "dashboard TLS needs both dashboard_tls_cert_file and dashboard_tls_key_file",
                field="dashboard_tls_cert_file",
            )
        if bool(self.device_ca_cert_file) != bool(self.device_ca_key_file):
            raise InvalidArgument(
                "the device CA needs both device_ca_cert_file and device_ca_key_file",
                field="device_ca_cert_file",
            )
        if self.device_listen and not (self.device_ca_cert_file and self.tls_cert_file):
            raise InvalidArgument(
                "device_listen needs the device CA (device_ca_cert_file) and a server "
                "certificate (tls_cert_file)",
                field="device_listen",
            )
        if self.device_crl_file and not self.device_ca_cert_file:
            raise InvalidArgument(
                "device_crl_file needs the device CA (device_ca_cert_file)",
                field="device_crl_file",
            )
        if self.log_format not in ("text", "json"):
            raise InvalidArgument(
                f"{self.log_format!r} is not 'text' or 'json'", field="log_format"
            )

    # Replicas on one PostgreSQL: each has its own id (default: its MQTT username,
    # which must differ per replica anyway since it names the broker session).
    # The holder of the engine lease runs the engine, publishes desired states and
    # re-signs the timestamp; it renews every lease_renew_seconds and stops that
    # work if it could not renew within lease_duration_seconds, after which
    # another replica takes over.
    replica_id: str = ""
    lease_duration_seconds: float = 15.0
    lease_renew_seconds: float = 5.0
    # How often the lease holder looks for desired states committed by commands
    # that another replica served (its own commands wake it at once).
    publish_poll_seconds: float = 2.0
    # GetRollout answers from memory: an entry is dropped when its rollout's row or
    # progress changes (on every replica), and is never older than this, which
    # bounds what no writer announces (a draft's eligible count as the fleet changes).
    # 0 reads the database on every call.
    rollout_cache_seconds: float = 1.0
    # A verified API token is trusted this long without the database. Its
    # revocation reaches every replica at once (the same notices); this bounds a
    # change nobody announced. Expiry is checked on every call.
    token_cache_seconds: float = 10.0
    # Connections desired states are published on, each device always on the same
    # one: the control plane's own (mqtt_username) and, for each further one, an
    # account "<mqtt_username>-publish-<n>" (n = 2, 3, ...) with mqtt_password,
    # which `ota broker-config --publish-connections` writes. A connection may
    # have only the broker's Receive Maximum of publishes unacknowledged per round
    # trip, so more pay only for a distant broker (docs/OPERATIONS.md).
    publish_connections: int = PUBLISH_CONNECTIONS
    # Webhooks: plain http:// endpoints are refused unless this is set, and even
    # then only to a loopback address (a receiver on the same host, tests).
    webhook_allow_http: bool = False
    # One delivery attempt's deadline, and the retry schedule: attempt n that
    # failed waits about base * 2^(n-1) seconds (capped, with jitter); after
    # max_attempts the delivery is parked as dead until redelivered.
    webhook_timeout_seconds: float = 10.0
    webhook_retry_base_seconds: float = 5.0
    webhook_retry_max_seconds: float = 3600.0
    webhook_max_attempts: int = 12
    # CA bundle for https endpoints (empty = the system's).
    webhook_ca_file: str = ""

    @property
    def origin_caches(self) -> tuple[str, ...]:
        """Base URLs of the caches a root rotation purges."""
        return parse_cache_urls(self.origin_purge_urls, field="origin_purge_urls")

    @property
    def next_root_404_max_age(self) -> int:
        """How long caches keep the next root's 404: long only where a rotation purges it,
        so a device still learns of a rotation within the timestamp's lifetime otherwise."""
        if self.origin_caches:
            return self.origin_next_root_max_age
        return self.origin_timestamp_max_age

    @property
    def dashboard_tls(self) -> tuple[str, str]:
        """The dashboard's certificate and key files, ("", "") for plain HTTP."""
        if self.dashboard_tls_cert_file:
            return self.dashboard_tls_cert_file, self.dashboard_tls_key_file
        return self.tls_cert_file, self.tls_key_file


# The roles a configured token may carry (devices authenticate otherwise).
TOKEN_ROLES = ("admin", "release", "viewer")


@dataclass(frozen=True)
class Bound:
    """The accepted range of a numeric setting: what its consumer can hold, and sense."""

    low: float
    high: float
    unit: str
    why: str = ""

    def check(self, name: str, value: float) -> None:
        if not math.isfinite(value) or not self.low <= value <= self.high:
            why = f" ({self.why})" if self.why else ""
            raise InvalidArgument(
                f"must be between {self.low:g} and {self.high:g} {self.unit}{why}, got {value:g}",
                field=name,
            )


DAY = 24 * 3600
# Every numeric setting, bounded; docs/OPERATIONS.md (Configuration reference) lists them.
BOUNDS: dict[str, Bound] = {
    "desired_state_ttl_seconds": Bound(
        60, 366 * DAY, "seconds", "renewed halfway through; a device refuses an expired state"
    ),
    "engine_interval_seconds": Bound(0.01, 60, "seconds"),
    # The broker may send twice a batch before an acknowledgement: MQTT's receive
    # maximum is a 16-bit field.
    "ingest_batch_size": Bound(1, 10_000, "messages"),
    "ingest_max_payload_bytes": Bound(1024, 16 * 1024 * 1024, "bytes"),
    "ingest_device_rate": Bound(0, 100_000, "messages per second", "0 turns the limit off"),
    "ingest_device_burst": Bound(1, 1_000_000, "messages"),
    "ingest_workers": Bound(0, 32, "processes", "0 or 1 ingests in the control plane's process"),
    "lease_duration_seconds": Bound(1, 3600, "seconds"),
    "lease_renew_seconds": Bound(0.1, 3600, "seconds"),
    "publish_poll_seconds": Bound(0.05, 600, "seconds"),
    "rollout_cache_seconds": Bound(0, 60, "seconds", "how old a GetRollout answer may be"),
    "token_cache_seconds": Bound(0, 300, "seconds", "how long a verified token is trusted"),
    "publish_connections": Bound(
        1, MAX_PUBLISH_CONNECTIONS, "connections", "each needs its own broker account"
    ),
    "webhook_timeout_seconds": Bound(0.1, 300, "seconds"),
    "webhook_retry_base_seconds": Bound(0.1, 3600, "seconds"),
    "webhook_retry_max_seconds": Bound(1, 7 * DAY, "seconds"),
    "webhook_max_attempts": Bound(1, 100, "attempts"),
    "origin_timestamp_max_age": Bound(0, 3600, "seconds", "how long caches keep timestamp.json"),
    "origin_next_root_max_age": Bound(
        0, 86_400, "seconds", "how long purged caches keep the next root's 404"
    ),
}

_ENV_PREFIX = "OTA_"


def load_server_config(
    path: Path | None, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None
) -> ServerConfig:
    """Build a ServerConfig from a TOML file, `OTA_*` variables and flag overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                values.update(tomllib.load(f))
        except FileNotFoundError as exc:
            raise InvalidArgument(f"config file {path} does not exist", field="config") from exc
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(
                f"config file {path} is not valid TOML: {exc}", field="config"
            ) from exc
    env = dict(os.environ) if env is None else env
    known = {f.name: f for f in fields(ServerConfig)}
    for name in known:
        key = _ENV_PREFIX + name.upper()
        if key in env and name != "tokens":
            values[name] = env[key]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(values) - set(known)
    if unknown:
        raise InvalidArgument(f"unknown settings: {', '.join(sorted(unknown))}", field="config")
    return _coerce(replace(ServerConfig()), values)


def _coerce(base: ServerConfig, values: dict[str, Any]) -> ServerConfig:
    converted: dict[str, Any] = {}
    for f in fields(ServerConfig):
        if f.name not in values:
            continue
        raw = values[f.name]
        default = getattr(base, f.name)
        try:
            if isinstance(default, Path):
                converted[f.name] = Path(raw)
            elif isinstance(default, bool):
                converted[f.name] = (
                    raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true")
                )
            elif isinstance(default, int):
                converted[f.name] = _whole(raw)
            elif isinstance(default, float):
                if isinstance(raw, bool):
                    raise ValueError(raw)
                converted[f.name] = float(raw)
            elif isinstance(default, dict):
                converted[f.name] = {str(k): str(v) for k, v in dict(raw).items()}
            else:
                if isinstance(raw, (dict, list)):
                    raise ValueError(raw)
                converted[f.name] = str(raw)
        except (TypeError, ValueError) as exc:
            shown = "the value" if f.name in _SECRETS else repr(raw)
            raise InvalidArgument(
                f"{shown} is not valid (expected {_KIND.get(type(default), 'text')})",
                field=f.name,
            ) from exc
    return replace(base, **converted)


_KIND = {int: "a whole number", float: "a number", dict: "a table", Path: "a path"}
# Settings whose values never go into an error line (it ends up in logs).
_SECRETS = frozenset({"tokens", "mqtt_password"})


def _whole(raw: Any) -> int:
    """An integer setting: 1.5 or true is a mistake, not 1."""
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    return int(raw)
