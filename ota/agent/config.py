"""The agent's configuration: one TOML file, every path relative to the file's directory.

A mistake is an `InvalidArgument` naming the key, so `ota-agent` can print one
line and exit instead of starting half-configured.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ota.domain.version import Version
from ota.errors import InvalidArgument

HOOK_NAMES = ("install", "activate", "deactivate", "rollback", "health")

DEFAULT_HOOK_TIMEOUT = 300.0
DEFAULT_OUTPUT_LIMIT = 1 << 20
DEFAULT_HEALTH_INTERVAL = 300.0
IDENTITIES = ("password", "certificate")


@dataclass(frozen=True)
class TlsFiles:
    """The CA that signed the control plane's (and broker's) certificate, and a client
    certificate with its key where the control plane asks for one (mTLS)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class HookSettings:
    """The device team's executables (None: not used) and the limits each run gets."""

    paths: Mapping[str, Path | None]
    timeout_seconds: float = DEFAULT_HOOK_TIMEOUT
    output_limit_bytes: int = DEFAULT_OUTPUT_LIMIT


@dataclass(frozen=True)
class AgentConfig:
    """What `ota-agent` runs with.

    `identity` "password": `secret` authenticates it to the broker and the
    control plane. "certificate": on first start it enrolls with
    `enrollment_token` on `server` for a certificate of the device CA (its key
    made here, kept in `identity_dir`), then speaks mutual TLS to the broker, to
    `device_server` (the control plane's device port) and to the delivery origin.
    """

    device_id: str
    secret: str
    server: str  # host:port of the control plane's gRPC API
    broker: str  # mqtt://host:port or mqtts://host:port
    state_dir: Path
    trusted_root: Path
    model: str
    firmware: str
    region: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    topic_root: str = "ota/v1"
    grpc_tls: TlsFiles | None = None
    mqtt_tls: TlsFiles | None = None
    hooks: HookSettings = field(default_factory=lambda: HookSettings({}))
    health_interval_seconds: float = DEFAULT_HEALTH_INTERVAL
    download_attempts: int = 8
    log_format: str = "text"
    identity: str = "password"
    enrollment_token: str = ""
    device_server: str = ""  # host:port of the control plane's device port (mutual TLS)
    # TUF metadata and bundles over HTTP(S) from here (the origin, a cache or a CDN);
    # empty: over gRPC from the control plane.
    origin_url: str = ""
    origin_token: str = ""
    origin_ca_file: Path | None = None  # None: the system's CAs

    @property
    def certificate(self) -> bool:
        return self.identity == "certificate"

    @property
    def identity_dir(self) -> Path:
        """The device's key (0600), certificate and the device CA's certificate."""
        return self.state_dir / "identity"

    @property
    def broker_host_port(self) -> tuple[str, int]:
        parts = urlsplit(self.broker)
        return parts.hostname or "", parts.port or (8883 if parts.scheme == "mqtts" else 1883)


_KEYS = {
    "device_id",
    "secret",
    "secret_file",
    "server",
    "broker",
    "state_dir",
    "trusted_root",
    "model",
    "firmware",
    "region",
    "labels",
    "topic_root",
    "tls",
    "hooks",
    "health_interval_seconds",
    "download_attempts",
    "log_format",
    "identity",
    "enrollment_token",
    "enrollment_token_file",
    "device_server",
    "origin_url",
    "origin_token",
}
_TLS_KEYS = {"ca_file", "cert_file", "key_file", "mqtt_ca_file", "origin_ca_file"}
_HOOK_KEYS = {*HOOK_NAMES, "timeout_seconds", "output_limit_bytes"}


def load_config(path: Path) -> AgentConfig:
    """Read and check the agent's TOML file."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field="config") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path} is not valid TOML: {exc}", field="config") from exc
    return parse_config(doc, base=path.resolve().parent)


def parse_config(doc: Mapping[str, Any], *, base: Path) -> AgentConfig:
    _no_unknown(doc, _KEYS, "")
    identity = str(doc.get("identity", "password"))
    if identity not in IDENTITIES:
        raise InvalidArgument(
            f"must be password or certificate, got {identity!r}", field="identity"
        )
    certificate = identity == "certificate"
    if certificate:
        if "secret" in doc or "secret_file" in doc:
            raise InvalidArgument(
                "a certificate device has no secret; it enrolls with enrollment_token",
                field="secret",
            )
        secret = ""
        token = _optional_secret(doc, "enrollment_token", base)
        device_server = _host_port(doc, "device_server")
    else:
        for key in ("enrollment_token", "enrollment_token_file", "device_server"):
            if key in doc:
                raise InvalidArgument('needs identity = "certificate"', field=key)
        secret = _secret(doc, base)
        token, device_server = "", ""
    server = _host_port(doc, "server")
    broker = _text(doc, "broker")
    scheme = urlsplit(broker).scheme
    if scheme not in ("mqtt", "mqtts") or not urlsplit(broker).hostname:
        raise InvalidArgument(
            f"must be mqtt://host:port or mqtts://host:port, got {broker!r}", field="broker"
        )
    firmware = _text(doc, "firmware")
    Version.parse(firmware, field="firmware")
    labels = doc.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidArgument("must be a table of strings", field="labels")
    tls_doc = doc.get("tls", {})
    grpc_tls, mqtt_tls = _tls(tls_doc, base)
    if scheme == "mqtts" and mqtt_tls is None:
        mqtt_tls = TlsFiles()  # the system's CAs
    if certificate:
        if scheme != "mqtts":
            raise InvalidArgument(
                "a certificate device needs the broker's TLS listener, mqtts://host:port",
                field="broker",
            )
        if grpc_tls is not None and grpc_tls.cert_file is not None:
            raise InvalidArgument(
                "a certificate device uses the certificate it enrolled for", field="tls.cert_file"
            )
        if grpc_tls is None:
            grpc_tls = TlsFiles()  # the enrollment token is a credential: TLS, system CAs
    origin_url = str(doc.get("origin_url", ""))
    if origin_url and not origin_url.startswith(("http://", "https://")):
        raise InvalidArgument(
            f"must be an http:// or https:// URL, got {origin_url!r}", field="origin_url"
        )
    if certificate and origin_url.startswith("http://"):
        raise InvalidArgument(
            "a certificate device presents its certificate over https:// only",
            field="origin_url",
        )
    log_format = str(doc.get("log_format", "text"))
    if log_format not in ("text", "json"):
        raise InvalidArgument(f"must be text or json, got {log_format!r}", field="log_format")
    attempts = doc.get("download_attempts", 8)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        raise InvalidArgument("must be a whole number of at least 1", field="download_attempts")
    return AgentConfig(
        device_id=_text(doc, "device_id"),
        secret=secret,
        server=server,
        broker=broker,
        state_dir=_path(doc, "state_dir", base),
        trusted_root=_path(doc, "trusted_root", base),
        model=_text(doc, "model"),
        firmware=firmware,
        region=str(doc.get("region", "")),
        labels=dict(labels),
        topic_root=str(doc.get("topic_root", "ota/v1")),
        grpc_tls=grpc_tls,
        mqtt_tls=mqtt_tls,
        hooks=_hooks(doc.get("hooks", {}), base),
        health_interval_seconds=_seconds(doc, "health_interval_seconds", DEFAULT_HEALTH_INTERVAL),
        download_attempts=attempts,
        log_format=log_format,
        identity=identity,
        enrollment_token=token,
        device_server=device_server,
        origin_url=origin_url,
        origin_token=str(doc.get("origin_token", "")),
        origin_ca_file=_optional_path(tls_doc, "origin_ca_file", base, "tls."),
    )


def _no_unknown(doc: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidArgument(
            f"unknown key (known: {', '.join(sorted(known))})", field=prefix + unknown[0]
        )


def _text(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if value is not None and not isinstance(value, str):
        # TOML reads `firmware = 4.2` as a number: say so, not that the key is missing.
        raise InvalidArgument(
            f'must be a string in quotes, got {value!r}: write {key} = "{value}"', field=key
        )
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgument("is required (a non-empty string)", field=key)
    return value.strip()


def _path(doc: Mapping[str, Any], key: str, base: Path, prefix: str = "") -> Path:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidArgument("is required (a path)", field=prefix + key)
    return base / Path(value).expanduser()


def _optional_path(doc: Mapping[str, Any], key: str, base: Path, prefix: str) -> Path | None:
    if not doc.get(key):
        return None
    return _path(doc, key, base, prefix)


def _seconds(doc: Mapping[str, Any], key: str, default: float, prefix: str = "") -> float:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidArgument("must be a number of seconds, 0 or more", field=prefix + key)
    return float(value)


def _host_port(doc: Mapping[str, Any], key: str) -> str:
    value = _text(doc, key)
    if ":" not in value:
        raise InvalidArgument(f"must be host:port, got {value!r}", field=key)
    return value


def _optional_secret(doc: Mapping[str, Any], key: str, base: Path) -> str:
    """`key` or `key_file` (a file holding it), or empty: e.g. the enrollment token, which
    a device provisioned with its certificate at the factory does not need."""
    if key in doc and f"{key}_file" in doc:
        raise InvalidArgument(f"give {key} or {key}_file, not both", field=key)
    if f"{key}_file" in doc:
        path = _path(doc, f"{key}_file", base)
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {path}: {exc.strerror}", field=f"{key}_file"
            ) from exc
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise InvalidArgument("must be a string", field=key)
    return value.strip()


def _secret(doc: Mapping[str, Any], base: Path) -> str:
    if "secret" in doc and "secret_file" in doc:
        raise InvalidArgument("give secret or secret_file, not both", field="secret")
    if "secret_file" in doc:
        path = _path(doc, "secret_file", base)
        try:
            secret = path.read_text().strip()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {path}: {exc.strerror}", field="secret_file"
            ) from exc
        if not secret:
            raise InvalidArgument(f"{path} is empty", field="secret_file")
        return secret
    return _text(doc, "secret")


def _tls(doc: Any, base: Path) -> tuple[TlsFiles | None, TlsFiles | None]:
    if not isinstance(doc, dict):
        raise InvalidArgument("must be a table", field="tls")
    _no_unknown(doc, _TLS_KEYS, "tls.")
    ca = _optional_path(doc, "ca_file", base, "tls.")
    cert = _optional_path(doc, "cert_file", base, "tls.")
    key = _optional_path(doc, "key_file", base, "tls.")
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs its key", field="tls.cert_file")
    grpc_tls = TlsFiles(ca, cert, key) if ca or cert else None
    mqtt_ca = _optional_path(doc, "mqtt_ca_file", base, "tls.")
    mqtt_tls = TlsFiles(mqtt_ca or ca, cert, key) if mqtt_ca else None
    return grpc_tls, mqtt_tls


def _hooks(doc: Any, base: Path) -> HookSettings:
    if not isinstance(doc, dict):
        raise InvalidArgument("must be a table", field="hooks")
    _no_unknown(doc, _HOOK_KEYS, "hooks.")
    paths = {name: _optional_path(doc, name, base, "hooks.") for name in HOOK_NAMES}
    timeout = _seconds(doc, "timeout_seconds", DEFAULT_HOOK_TIMEOUT, "hooks.")
    if timeout <= 0:
        raise InvalidArgument("must be more than 0", field="hooks.timeout_seconds")
    limit = doc.get("output_limit_bytes", DEFAULT_OUTPUT_LIMIT)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1024:
        raise InvalidArgument(
            "must be a whole number, 1024 or more", field="hooks.output_limit_bytes"
        )
    return HookSettings(paths, timeout, limit)


def render_config(values: Mapping[str, Any]) -> str:
    """TOML for a flat mapping of strings, numbers and tables of strings (what `ota fleet
    register --agent-config` writes); no TOML writer in the standard library."""
    import json

    top: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, dict):
            if not value:
                continue
            tables.append(f"\n[{key}]")
            tables += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()]
        else:
            top.append(f"{key} = {json.dumps(value)}")
    return "\n".join(top + tables) + "\n"


def check_files(config: AgentConfig) -> None:
    """What `ota-agent --check` adds to reading the file: the files it names are there.

    Reading the config never touches them (a hook may be installed after its
    config); a deployment check should still fail where the first start or the
    first install would."""
    if not config.trusted_root.is_file():
        raise InvalidArgument(f"{config.trusted_root} is not a file", field="trusted_root")
    tls_files = {
        "tls.ca_file": config.grpc_tls.ca_file if config.grpc_tls else None,
        "tls.cert_file": config.grpc_tls.cert_file if config.grpc_tls else None,
        "tls.key_file": config.grpc_tls.key_file if config.grpc_tls else None,
        "tls.mqtt_ca_file": config.mqtt_tls.ca_file if config.mqtt_tls else None,
        "tls.origin_ca_file": config.origin_ca_file,
    }
    for key, path in tls_files.items():
        if path is not None and not path.is_file():
            raise InvalidArgument(f"{path} is not a file", field=key)
    for name, hook in config.hooks.paths.items():
        if hook is None:
            continue
        if not hook.is_file():
            raise InvalidArgument(f"{hook} is not a file", field=f"hooks.{name}")
        if not os.access(hook, os.X_OK):
            raise InvalidArgument(f"{hook} is not executable", field=f"hooks.{name}")
