"""The Mosquitto 2.0 configuration ota needs: listener, persistence, credentials, ACL, subscription guard, limits.

`write_broker_config` renders the broker config, its ACL, its password file
and the list of control-plane users into one directory, builds the
subscription guard plugin there, and creates the persistence directory.
Every path in them is absolute, so the broker can be started from anywhere.
Devices authenticate with username = device id; the ACL confines what each
publishes and receives to its own topics, and the subscription guard refuses
any SUBSCRIBE of a device but to its own desired topic (PROTOCOL §4).
The control plane's users may use the whole topic root, including the shared
ingest subscription.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from ota.broker.passwords import PasswordFile, check_username
from ota.broker.subscribe_guard import PLUGIN_NAME, build_guard_plugin
from ota.errors import InvalidArgument

KIB = 1024
# ota serve's publish_connections default and its bound (ota.config).
PUBLISH_CONNECTIONS = 1
MAX_PUBLISH_CONNECTIONS = 16

_TOPIC_ROOT = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_EXPIRATION = re.compile(r"^[1-9][0-9]*[hdwmy]$")


@dataclass(frozen=True)
class BrokerSettings:
    """What the generated Mosquitto config says; defaults suit one machine.

    Attributes:
        port: TCP port of the single MQTT listener (default 1883; 0 asks
            `start_private_broker` to pick a free one).
        bind_address: address the listener binds to (default 127.0.0.1).
        topic_root: root of every ota topic (default ``ota/v1``).
        control_username: the control plane's broker user; reads and writes
            everything under the topic root.
        extra_control_usernames: more users with the control plane's ACL. Since
            the username is the client id (`use_username_as_clientid`), each
            extra MQTT connection of the control plane (a second replica's
            ingester, say) needs its own username; set their secrets with
            `PasswordFile` and reload.
        publish_connections: the connections each control-plane user
            publishes desired states on (the `ota serve` setting of that name,
            default 1): the user's own and, for each further one, an account
            ``<user>-publish-<n>`` (n = 2, 3, ...) with the same password that
            may only publish desired states (`publish_usernames`).
        ingest_workers: broker accounts for this many ingest worker processes
            of each control user (`<user>-ingest-1` ...; default 2, this
            machine class's cores), with the control ACL and the control user's
            password: each worker is a session of its own, named after its user.
            The control plane's `ingest_workers` may be up to this.
        persistence: keep retained messages, sessions and queued messages in
            ``mosquitto.db`` across restarts (default on).
        autosave_interval_s: seconds between saves of the in-memory database
            (default 60; Mosquitto also saves on a clean shutdown).
        max_packet_size: largest MQTT packet accepted, bytes (default 256 KiB);
            a client sending a larger one is disconnected.
        message_size_limit: largest publish payload, bytes, refused with a
            PUBACK error instead of a disconnect; None (default) leaves it
            out, as Mosquitto 2.0 recommends `max_packet_size` instead.
        max_queued_messages: QoS 1/2 messages queued per client beyond those
            in flight (default 1 000 000); Mosquitto drops further ones
            silently. The limit is per client but global in Mosquitto 2.0, and
            the client that needs it is the control plane: its persistent
            session queues every device event while it is down or busy, so a
            small limit loses telemetry under load. Devices use clean sessions
            and queue nothing while offline.
        max_queued_bytes: the same limit in bytes (default 512 MiB), which
            bounds the broker's memory per client instead.
        max_inflight_messages: unacknowledged QoS 1/2 messages in flight to one
            client (default 100; Mosquitto's own default is 20). An MQTT 5
            client that sends Receive Maximum gets that window instead, larger
            or smaller — so an ingester acking after its database commit sets
            Receive Maximum to its batch size.
        persistent_client_expiration: drop persistent sessions not resumed
            within this time, e.g. ``14d`` (Mosquitto units h d w m y);
            None keeps them forever. Default 30d, so revoked or scrapped
            devices do not hold queued messages for ever.
        run_as_user: when started as root, Mosquitto switches to this user.
            None (default) means the user writing the config, who owns its
            0600 files and so can still read them on reload.
        log_to_stdout: also log to stdout (a container's log), besides the
            log file (default off).
        tls_port: a second listener speaking MQTT over TLS (conventionally
            8883), with the same accounts and ACL; None (default) = none. 0
            asks `start_private_broker` for a free port.
        tls_cafile, tls_certfile, tls_keyfile: PEM files of that listener:
            the CA, the broker's certificate and its key (absolute paths).
        tls_require_certificate: clients on the TLS listener must present a
            certificate signed by `tls_cafile` (the device CA), whose common
            name becomes their username (`use_identity_as_username`), so the
            ACL's `%u` patterns and the subscription guard see the device id;
            no password is asked (default off: devices authenticate with
            username and password).
        tls_crlfile: the device CA's CRL (PEM) for that listener; Mosquitto
            re-reads it on SIGHUP and then refuses a revoked certificate's
            handshake. It must always hold a current CRL of the device CA
            (an expired one makes OpenSSL refuse every client), so
            `ota serve` rewrites it (`device_crl_file`) or an operator
            fetches it with `ota fleet crl`.
        max_connections: client connections the listener accepts; -1
            (default) means no limit but the process's open-file limit.
        max_open_files: the open-file limit (RLIMIT_NOFILE) `MosquittoProcess`
            gives the broker: one per client connection plus a few for its
            own files. Default 65 536, enough for a 10 000-device simulated
            fleet on one machine with room to spare; a broker started as
            another user or by a service manager takes its limit from there
            (systemd: `LimitNOFILE=`).
        subscribe_guard: load the subscription guard plugin (default on), so
            a device may subscribe only to its own desired topic and is
            refused (SUBACK 0x87) anything else. Off is unsafe: one device's
            credentials can then join the control plane's shared ingest
            subscription and take a share of every device's events.
        subscribe_guard_plugin: an absolute path to a guard plugin built
            elsewhere (for a broker host without a C compiler); None (default)
            builds it from the shipped source.
    """

    port: int = 1883
    bind_address: str = "127.0.0.1"
    topic_root: str = "ota/v1"
    control_username: str = "ota-control"
    extra_control_usernames: tuple[str, ...] = ()
    publish_connections: int = PUBLISH_CONNECTIONS
    ingest_workers: int = 2
    persistence: bool = True
    autosave_interval_s: int = 60
    max_packet_size: int = 256 * KIB
    message_size_limit: int | None = None
    max_queued_messages: int = 1_000_000
    max_queued_bytes: int = 512 * 1024 * 1024
    max_inflight_messages: int = 100
    persistent_client_expiration: str | None = "30d"
    run_as_user: str | None = None
    log_to_stdout: bool = False
    tls_port: int | None = None
    tls_cafile: str | None = None
    tls_certfile: str | None = None
    tls_keyfile: str | None = None
    tls_require_certificate: bool = False
    tls_crlfile: str | None = None
    max_connections: int = -1
    max_open_files: int = 65_536
    subscribe_guard: bool = True
    subscribe_guard_plugin: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidArgument(f"port {self.port} is outside 0-65535", field="port")
        if not _TOPIC_ROOT.match(self.topic_root):
            raise InvalidArgument(
                f"{self.topic_root!r} is not a topic root such as 'ota/v1' "
                "(levels of letters, digits, '.', '_', '-'; no wildcards)",
                field="topic_root",
            )
        check_username(self.control_username, field="control_username")
        for name in self.extra_control_usernames:
            check_username(name, field="extra_control_usernames")
        if not 1 <= self.publish_connections <= MAX_PUBLISH_CONNECTIONS:
            raise InvalidArgument(
                f"must be 1 to {MAX_PUBLISH_CONNECTIONS}, got {self.publish_connections}",
                field="publish_connections",
            )
        for name in self.control_usernames:
            for publisher in publish_usernames(name, self.publish_connections):
                check_username(publisher, field="publish_connections")
        if not 0 <= self.ingest_workers <= 32:
            raise InvalidArgument(
                f"must be 0 to 32, got {self.ingest_workers}", field="ingest_workers"
            )
        for replica in self.control_usernames:
            for name in self.worker_usernames(replica):
                check_username(name, field="ingest_workers")
        for name, value in (
            ("autosave_interval_s", self.autosave_interval_s),
            ("max_queued_messages", self.max_queued_messages),
            ("max_queued_bytes", self.max_queued_bytes),
            ("max_inflight_messages", self.max_inflight_messages),
            ("ingest_workers", self.ingest_workers),
        ):
            if value < 0:
                raise InvalidArgument(f"must be >= 0, got {value}", field=name)
        if self.max_connections < -1 or self.max_connections == 0:
            raise InvalidArgument(
                f"must be -1 (no limit) or at least 1, got {self.max_connections}",
                field="max_connections",
            )
        if self.max_open_files < 64:
            raise InvalidArgument(
                f"must be at least 64, got {self.max_open_files}", field="max_open_files"
            )
        if not 20 <= self.max_packet_size <= 268_435_460:
            raise InvalidArgument(
                f"must be 20 bytes to 256 MiB, got {self.max_packet_size}",
                field="max_packet_size",
            )
        if self.message_size_limit is not None and not (0 < self.message_size_limit <= 268_435_455):
            raise InvalidArgument(
                f"must be 1 to 268435455 bytes, got {self.message_size_limit}",
                field="message_size_limit",
            )
        if self.persistent_client_expiration is not None and not _EXPIRATION.match(
            self.persistent_client_expiration
        ):
            raise InvalidArgument(
                f"{self.persistent_client_expiration!r} is not a duration such as 12h or 30d",
                field="persistent_client_expiration",
            )
        if self.tls_port is not None:
            if not 0 <= self.tls_port <= 65535:
                raise InvalidArgument(f"port {self.tls_port} is outside 0-65535", field="tls_port")
            for name in ("tls_cafile", "tls_certfile", "tls_keyfile"):
                path = getattr(self, name)
                if not path or not os.path.isabs(path) or any(c.isspace() for c in path):
                    raise InvalidArgument(
                        "a TLS listener needs an absolute path without whitespace", field=name
                    )
        if self.tls_crlfile is not None:
            if not self.tls_require_certificate:
                raise InvalidArgument(
                    "a CRL needs client certificates (tls_require_certificate)",
                    field="tls_crlfile",
                )
            if not os.path.isabs(self.tls_crlfile) or any(c.isspace() for c in self.tls_crlfile):
                raise InvalidArgument(
                    "the CRL needs an absolute path without whitespace", field="tls_crlfile"
                )
        if self.tls_require_certificate and self.tls_port is None:
            raise InvalidArgument(
                "client certificates need the TLS listener (tls_port)",
                field="tls_require_certificate",
            )
        if self.subscribe_guard_plugin is not None:
            path = self.subscribe_guard_plugin
            if not os.path.isabs(path) or any(c.isspace() for c in path):
                raise InvalidArgument(
                    "the guard plugin needs an absolute path without whitespace",
                    field="subscribe_guard_plugin",
                )
            if not self.subscribe_guard:
                raise InvalidArgument(
                    "a guard plugin was given with the subscription guard off",
                    field="subscribe_guard_plugin",
                )
        for name, text in (("bind_address", self.bind_address), ("run_as_user", self.run_as_user)):
            if text is not None and (not text or any(c.isspace() for c in text)):
                raise InvalidArgument(f"{text!r} must be one word", field=name)

    @property
    def control_usernames(self) -> tuple[str, ...]:
        """Every control-plane user, one per replica (their ingest workers apart)."""
        return (self.control_username, *self.extra_control_usernames)

    def accounts_of(self, control_username: str) -> tuple[str, ...]:
        """A control-plane user and its publishing and ingest worker accounts, which
        share its password."""
        return (
            control_username,
            *publish_usernames(control_username, self.publish_connections),
            *self.worker_usernames(control_username),
        )

    def worker_usernames(self, control_username: str) -> tuple[str, ...]:
        """The ingest worker accounts of one control-plane user (control ACL, its password)."""
        return tuple(f"{control_username}-ingest-{i}" for i in range(1, self.ingest_workers + 1))

    @property
    def ingest_usernames(self) -> tuple[str, ...]:
        """Every control-plane user's ingest worker accounts."""
        return tuple(w for name in self.control_usernames for w in self.worker_usernames(name))

    def events_share_filter(self, group: str = "ota-ingest") -> str:
        """The shared subscription the ingester uses for every device's events."""
        return f"$share/{group}/{self.topic_root}/devices/+/events"


def publish_usernames(username: str, connections: int) -> list[str]:
    """The accounts of a control plane's publishing connections after its own.

    The broker names a session after its username, so each connection needs
    one; they share the control plane's password (`publish_connections`).
    """
    return [f"{username}-publish-{i}" for i in range(2, connections + 1)]


@dataclass(frozen=True)
class BrokerFiles:
    """Where `write_broker_config` put things (all absolute)."""

    conf: Path
    password_file: Path
    acl_file: Path
    persistence_dir: Path
    pid_file: Path
    log_file: Path
    control_users_file: Path
    guard_plugin: Path


def broker_files(out_dir: Path) -> BrokerFiles:
    """The file layout under `out_dir`, without writing anything."""
    root = Path(out_dir).expanduser().resolve()
    return BrokerFiles(
        conf=root / "mosquitto.conf",
        password_file=root / "passwords",
        acl_file=root / "acl",
        persistence_dir=root / "data",
        pid_file=root / "mosquitto.pid",
        log_file=root / "mosquitto.log",
        control_users_file=root / "control-users",
        guard_plugin=root / PLUGIN_NAME,
    )


def write_broker_config(
    out_dir: Path, settings: BrokerSettings, *, control_password: str
) -> BrokerFiles:
    """Write the config, ACL and password file into `out_dir`.

    Idempotent: the config and ACL are rewritten, while the password file
    keeps its other users (devices) and only the control user's secret is
    set, and the persistence directory is kept.
    """
    if not control_password:
        raise InvalidArgument("must not be empty", field="control_password")
    if settings.port == 0 or settings.tls_port == 0:
        raise InvalidArgument(
            "a config needs a real port; 0 (pick a free one) is only for start_private_broker",
            field="port",
        )
    files = broker_files(out_dir)
    for path in (files.conf.parent, files.persistence_dir):
        if any(c.isspace() for c in str(path)):
            # Mosquitto reads a path up to the first whitespace.
            raise InvalidArgument(
                f"{path} contains whitespace, which Mosquitto's config cannot express",
                field="out_dir",
            )
    files.conf.parent.mkdir(parents=True, exist_ok=True)
    if settings.subscribe_guard:
        # First, so a missing compiler leaves no config that would run unguarded.
        if settings.subscribe_guard_plugin is not None:
            _copy_plugin(Path(settings.subscribe_guard_plugin), files.guard_plugin)
        else:
            build_guard_plugin(files.guard_plugin)
    files.persistence_dir.mkdir(mode=0o700, exist_ok=True)

    PasswordFile(files.password_file).set_many(
        dict.fromkeys(settings.accounts_of(settings.control_username), control_password)
    )
    _write_private(files.acl_file, render_acl(settings))
    _write_private(files.control_users_file, render_control_users(settings))
    _write_private(files.conf, render_config(settings, files))
    return files


def _copy_plugin(src: Path, dest: Path) -> None:
    try:
        data = src.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the guard plugin at {src}: {exc.strerror}",
            field="subscribe_guard_plugin",
        ) from exc
    if src.resolve() == dest.resolve():
        return
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    os.replace(tmp, dest)


def render_control_users(settings: BrokerSettings) -> str:
    """The guard's list of control-plane users: every other user is a device."""
    return "\n".join(
        [
            "# Generated by ota (ota.broker.config); edits are overwritten.",
            "# The subscription guard leaves these users to the ACL; any other user is a",
            "# device and may subscribe only to its own desired topic. Re-read on reload.",
            *settings.control_usernames,
            *settings.ingest_usernames,
            "",
        ]
    )


def render_acl(settings: BrokerSettings) -> str:
    """The ACL file: control users own the root, each device only its own topics."""
    root = settings.topic_root
    lines = [
        "# Generated by ota (ota.broker.config); edits are overwritten.",
        "# Topics not granted here are denied. This file filters publishing and",
        "# delivery only: Mosquitto grants any SUBSCRIBE it is asked for. The",
        "# subscription guard plugin (see mosquitto.conf) refuses a device's",
        "# subscriptions to anything but its own desired topic.",
        "",
    ]
    for name in settings.control_usernames:
        lines += [f"user {name}", f"topic readwrite {root}/#", ""]
        # Its further publishing connections send desired states and nothing else.
        for publisher in publish_usernames(name, settings.publish_connections):
            lines += [f"user {publisher}", f"topic write {root}/devices/+/desired", ""]
    # Ingest worker processes: sessions of their control plane, with its ACL.
    for name in settings.ingest_usernames:
        lines += [f"user {name}", f"topic readwrite {root}/#", ""]
    lines += [
        "# Every user, devices included: username = device id = client id (on the",
        "# certificate listener the username is the certificate's common name).",
        f"pattern read {root}/devices/%u/desired",
        f"pattern write {root}/devices/%u/events",
        f"pattern write {root}/devices/%u/state",
        "",
    ]
    return "\n".join(lines)


def render_config(settings: BrokerSettings, files: BrokerFiles) -> str:
    """The mosquitto.conf text for `settings`, pointing at `files`."""
    s = settings
    user = s.run_as_user or pwd.getpwuid(os.geteuid()).pw_name
    lines = [
        "# Generated by ota (ota.broker.config) for Mosquitto 2.0; edits are overwritten.",
        f"user {user}",
        f"pid_file {files.pid_file}",
        "",
        "# One set of credentials and ACL for every listener.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {files.password_file}",
        f"acl_file {files.acl_file}",
    ]
    if s.subscribe_guard:
        lines += [
            # Decides SUBSCRIBE before the acl_file, which would grant it: a
            # device may subscribe only to its own desired topic.
            f"plugin {files.guard_plugin}",
            f"plugin_opt_topic_root {s.topic_root}",
            f"plugin_opt_control_users_file {files.control_users_file}",
        ]
    else:
        lines.append("# UNSAFE: no subscription guard; a device may join the ingest group.")
    lines += [
        "",
        f"persistence {_bool(s.persistence)}",
        f"persistence_location {files.persistence_dir}",
        "persistence_file mosquitto.db",
        f"autosave_interval {s.autosave_interval_s}",
    ]
    if s.persistent_client_expiration is not None:
        lines.append(f"persistent_client_expiration {s.persistent_client_expiration}")
    lines += [
        "",
        f"max_packet_size {s.max_packet_size}",
        f"max_queued_messages {s.max_queued_messages}",
        f"max_queued_bytes {s.max_queued_bytes}",
        f"max_inflight_messages {s.max_inflight_messages}",
    ]
    if s.message_size_limit is not None:
        lines.append(f"message_size_limit {s.message_size_limit}")
    lines += [
        # Desired states are small and latency matters more than packet count.
        "set_tcp_nodelay true",
        "",
        f"log_dest file {files.log_file}",
    ]
    if s.log_to_stdout:
        lines.append("log_dest stdout")
    lines += [
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp true",
        "connection_messages true",
        "",
        f"listener {s.port} {s.bind_address}",
        "protocol mqtt",
        # Each device holds one connection; the open-file limit is the real cap.
        f"max_connections {s.max_connections}",
        # The ACL's %u then names the device's own topics, and a device
        # cannot take over another device's session by choosing its client id.
        "use_username_as_clientid true",
        "",
    ]
    if s.tls_port is not None:
        lines += [
            f"listener {s.tls_port} {s.bind_address}",
            "protocol mqtt",
            f"cafile {s.tls_cafile}",
            f"certfile {s.tls_certfile}",
            f"keyfile {s.tls_keyfile}",
            f"require_certificate {_bool(s.tls_require_certificate)}",
        ]
        if s.tls_require_certificate:
            # The certificate's CN (the device id) is the username: no password
            # file entry, and the ACL and the guard work as on the password listener.
            lines.append("use_identity_as_username true")
            if s.tls_crlfile:
                lines.append(f"crlfile {s.tls_crlfile}")
        lines += ["use_username_as_clientid true", ""]
    return "\n".join(lines)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
