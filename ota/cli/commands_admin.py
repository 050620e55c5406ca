"""Commands that run things locally: serve, dev, demo, keys, broker-config."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined, unused-ignore]
from tuf.api.metadata import Root  # type: ignore[attr-defined, unused-ignore]

from ota.broker.config import PUBLISH_CONNECTIONS, BrokerSettings, write_broker_config
from ota.broker.passwords import PasswordFile
from ota.cli.connect import add_tls_options, connect
from ota.cli.output import console, emit_json
from ota.config import load_server_config
from ota.device.envelope import DIRECTOR_FIELD
from ota.errors import InvalidArgument
from ota.keyring import generate_keyring
from ota.logs import configure_logging
from ota.signing.keys import generate_key, load_public_key, public_key_path
from ota.signing.rootgen import RootChange, parse_root

log = logging.getLogger(__name__)


def register(nouns: Any) -> None:
    p = nouns.add_parser("serve", help="run the control plane")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--listen", help="gRPC listen address, e.g. 0.0.0.0:50051")
    p.add_argument("--database-url", help="sqlite:///ota.db or postgresql://...")
    p.add_argument("--mqtt-url", help="mqtt://host:port or mqtts://host:port")
    p.add_argument("--metrics-listen", help="serve Prometheus metrics here, e.g. 127.0.0.1:9464")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines as text or JSON")
    p.add_argument(
        "--origin-listen", help="serve TUF metadata and bundles over HTTP here, e.g. 0.0.0.0:8443"
    )
    p.add_argument("--dashboard-listen", help="serve the web dashboard here, e.g. 0.0.0.0:8080")
    p.set_defaults(handler=serve)

    repo = nouns.add_parser("repo", help="the TUF repository devices fetch from").add_subparsers(
        dest="verb", required=True
    )
    p = repo.add_parser(
        "export",
        help="write the repository's metadata and bundles to DIR, laid out as the HTTP "
        "origin serves them, for any static web server or object store",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="the directory to write, e.g. /srv/ota")
    p.add_argument("--config", type=Path, help="the control plane's TOML config file")
    p.add_argument("--database-url", help="sqlite:///ota.db or postgresql://...")
    p.add_argument("--data-dir", type=Path, help="where the bundle bytes are (data_dir)")
    p.set_defaults(handler=repo_export)
    p = repo.add_parser(
        "vcl", help="print a Varnish configuration for a shared cache in front of the origin"
    )
    p.add_argument("--origin", required=True, metavar="HOST:PORT", help="the origin_listen address")
    p.add_argument(
        "--token",
        default=os.environ.get("OTA_ORIGIN_TOKEN", ""),
        help="the fleet's delivery token the cache checks (env OTA_ORIGIN_TOKEN; empty: public)",
    )
    p.add_argument(
        "--purge-from",
        action="append",
        metavar="ADDRESS",
        help="an address (or network, 10.0.0.0/24) allowed to PURGE, e.g. the control "
        "plane's for origin_purge_urls; repeatable (default: loopback only)",
    )
    p.set_defaults(handler=repo_vcl)
    p = repo.add_parser(
        "nginx",
        help="print an nginx configuration for a shared cache that ends certificate devices' "
        "mutual TLS",
    )
    p.add_argument("--origin", required=True, metavar="HOST:PORT", help="the origin_listen address")
    p.add_argument("--listen", default="443", help="nginx's listen address (default 443)")
    p.add_argument("--cert", required=True, metavar="PEM", help="the cache's HTTPS certificate")
    p.add_argument("--key", required=True, metavar="PEM", help="its private key")
    p.add_argument("--device-ca", required=True, metavar="PEM", help="the device CA's certificate")
    p.add_argument(
        "--crl", required=True, metavar="PEM", help="the device CA's CRL (`ota fleet crl`)"
    )
    p.add_argument(
        "--origin-ca", default="", metavar="PEM", help="the origin's CA (empty: plain HTTP)"
    )
    p.add_argument("--origin-name", default="", help="the DNS name on the origin's certificate")
    p.add_argument(
        "--token",
        default=os.environ.get("OTA_ORIGIN_TOKEN", ""),
        help="the fleet's delivery token, sent to the origin (env OTA_ORIGIN_TOKEN)",
    )
    p.add_argument("--cache-dir", default="/var/cache/nginx/ota", help="where nginx keeps files")
    p.set_defaults(handler=repo_nginx)

    p = nouns.add_parser("dev", help="a private broker + control plane for trying things")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".ota-dev"),
        help="keys, database, broker files and env file (default .ota-dev)",
    )
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve gRPC over TLS from a development CA made under STATE_DIR/tls",
    )
    p.add_argument(
        "--mtls", action="store_true", help="like --tls, and clients need the CA's client cert"
    )
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=0,
        help="web dashboard port on 127.0.0.1 (0 = any free port, -1 = no dashboard)",
    )
    p.set_defaults(handler=dev)

    p = nouns.add_parser("demo", help="dev stack + simulated fleet + scripted rollouts")
    p.add_argument("--devices", type=int, default=1200, help="fleet size (default 1200)")
    p.add_argument("--state-dir", type=Path, help="keep the demo's files here (default: temporary)")
    p.set_defaults(handler=demo)

    p = nouns.add_parser("broker-config", help="write a Mosquitto config, ACL and password file")
    p.add_argument("--out", type=Path, required=True, help="directory for the broker's files")
    p.add_argument("--port", type=int, default=1883, help="MQTT listener port (default 1883)")
    p.add_argument(
        "--bind", default="127.0.0.1", help="listener address (default 127.0.0.1; 0.0.0.0: all)"
    )
    p.add_argument("--topic-root", default="ota/v1", help="root of every topic (default ota/v1)")
    p.add_argument("--tls-port", type=int, help="also listen for MQTT over TLS here (e.g. 8883)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the TLS listener")
    p.add_argument("--tls-cert", type=Path, help="the broker's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="the broker's private key (PEM)")
    p.add_argument(
        "--device-ca",
        type=Path,
        help="devices on the TLS listener authenticate with a certificate of this CA "
        "(ota keys device-ca); its common name is their username. Replaces --tls-ca",
    )
    p.add_argument(
        "--crl",
        type=Path,
        help="the device CA's CRL for the TLS listener, re-read on SIGHUP "
        "(ota serve --device-crl-file keeps it, or ota fleet crl)",
    )
    p.add_argument(
        "--replica",
        action="append",
        default=[],
        metavar="USERNAME",
        help="one more control-plane account, for another `ota serve` replica (repeatable)",
    )
    p.add_argument(
        "--publish-connections",
        type=int,
        default=PUBLISH_CONNECTIONS,
        metavar="N",
        help="connections each control plane publishes desired states on, as its "
        f"publish_connections setting (default {PUBLISH_CONNECTIONS}): an account "
        "USER-publish-2 .. USER-publish-N with the same password for each after the first",
    )
    p.add_argument(
        "--ingest-workers",
        type=int,
        default=2,
        metavar="N",
        help="accounts for N ingest worker processes per control-plane account "
        "(USER-ingest-1 ...), with that account's password; `ota serve`'s ingest_workers "
        "may be up to N (default 2)",
    )
    guard = p.add_mutually_exclusive_group()
    guard.add_argument(
        "--subscribe-guard-plugin",
        type=Path,
        metavar="PATH",
        help="use this prebuilt subscription guard (ota_subscribe_guard.so from another "
        "`ota broker-config` on the same OS) instead of building it here",
    )
    guard.add_argument(
        "--no-subscribe-guard",
        action="store_true",
        help="UNSAFE: leave out the plugin that refuses a device's subscriptions to anything "
        "but its own desired topic; one device's credentials can then divert the control "
        "plane's events",
    )
    p.set_defaults(handler=broker_config)

    keys = nouns.add_parser("keys", help="signing keys").add_subparsers(dest="verb", required=True)
    p = keys.add_parser(
        "device-ca",
        help="a device CA (device-ca.pem, device-ca.key) for device certificates",
        description="A new CA that signs device certificates at enrollment. Keep the key "
        "like the online keys: ota serve reads it (device_ca_cert_file, device_ca_key_file); "
        "brokers get the certificate alone.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="directory for device-ca.pem and device-ca.key"
    )
    p.set_defaults(handler=keys_device_ca)
    p = keys.add_parser(
        "generate",
        help="root, release (offline) and online keys, root.json",
        description="A new keyring: root and release keys (offline), snapshot, timestamp and "
        "director keys (online), the trust anchor root.json and the first targets.json. "
        "With N > 1 release keys they are release-1.pem..release-N.pem, one per engineer, "
        "and every bundle needs the threshold of them (likewise for root keys).",
    )
    p.add_argument("--out", type=Path, required=True, help="directory of the new keyring")
    p.add_argument("--root-keys", type=int, default=1, metavar="N", help="root keys (default 1)")
    p.add_argument("--root-threshold", type=int, default=1, metavar="K", help="K of N sign a root")
    p.add_argument(
        "--release-keys", type=int, default=1, metavar="N", help="release keys (default 1)"
    )
    p.add_argument(
        "--release-threshold", type=int, default=1, metavar="K", help="K of N sign a bundle"
    )
    p.set_defaults(handler=keys_generate)

    p = keys.add_parser(
        "new",
        help="one more Ed25519 key: PEM private key and .pub.json public key",
        description="Make a key for a rotation: FILE (PKCS#8 PEM, mode 0600) and "
        "FILE.pub.json (TUF key dict). Hand out only the .pub.json.",
    )
    p.add_argument(
        "files", nargs="+", type=Path, metavar="FILE", help="private key file, e.g. release-4.pem"
    )
    p.set_defaults(handler=keys_new)

    p = keys.add_parser(
        "rotate-root",
        help="build root N+1 here, signed by the current and new root keys, and upload it",
        description="Fetch root N, apply the changes given (root keys, release keys, online "
        "keys, thresholds), sign root N+1 with the root keys given (the threshold of the "
        "current root AND of the new one) and upload it. Private keys never leave this "
        "machine. New release keys also re-sign the current targets (--release-key). "
        "See docs/KEYS.md for each runbook.",
    )
    p.add_argument(
        "--old-key",
        action="append",
        type=Path,
        default=[],
        required=True,
        help="a root key of the current root (repeat up to its threshold)",
    )
    p.add_argument(
        "--new-key",
        action="append",
        type=Path,
        default=[],
        help="a root key of the new root, which signs too (repeat); default: root keys unchanged",
    )
    p.add_argument(
        "--new-root-pub",
        action="append",
        type=Path,
        default=[],
        help="a further new root public key that does not sign now (repeat)",
    )
    p.add_argument("--root-threshold", type=int, help="root threshold of the new root")
    p.add_argument(
        "--release-pub",
        action="append",
        type=Path,
        default=[],
        help="the new release keys, public (.pub.json or .pem; repeat): replaces the set",
    )
    p.add_argument("--release-threshold", type=int, help="release threshold of the new root")
    p.add_argument(
        "--release-key",
        action="append",
        type=Path,
        default=[],
        help="release private key that re-signs the current targets for the new root (repeat)",
    )
    for role in ("snapshot", "timestamp", "director"):
        p.add_argument(
            f"--{role}-pub",
            action="append",
            type=Path,
            default=[],
            help=f"the {role} public key(s) of the new root (repeat to list old and new)",
        )
    p.add_argument(
        "--expires-in-days", type=int, default=365, help="lifetime of root N+1 (default 365)"
    )
    p.add_argument("--trusted-root", type=Path, help="verify the server's root chain from this")
    p.add_argument("--out", type=Path, help="also write root N+1 to this file")
    p.add_argument("--dry-run", action="store_true", help="show root N+1, upload nothing")
    _client_options(p)
    p.set_defaults(handler=keys_rotate_root)


def serve(args: argparse.Namespace) -> int:
    from ota.app import ControlPlane

    overrides = {
        "listen": args.listen,
        "database_url": args.database_url,
        "mqtt_url": args.mqtt_url,
        "metrics_listen": args.metrics_listen,
        "dashboard_listen": args.dashboard_listen,
        "log_format": args.log_format,
        "origin_listen": args.origin_listen,
    }
    config = load_server_config(args.config, overrides=overrides)
    # A server says what it is doing (INFO), in the format its log collector reads.
    configure_logging(config.log_format, verbose=True)
    plane = ControlPlane.build(config)
    plane.start()
    console.print(f"ota control plane serving on {config.listen} (port {plane.port})")
    if plane.origin_url:
        console.print(f"delivery origin at {plane.origin_url}/")
    if plane.dashboard_url:
        console.print(f"dashboard at {plane.dashboard_url}")
    received = _wait_for_signal()
    log.info("%s received: stopping the control plane", received)
    plane.stop()
    log.info("control plane stopped")
    return 0


def repo_export(args: argparse.Namespace) -> int:
    from ota.delivery.export import export_repository
    from ota.store.database import open_database
    from ota.store.session import Store

    config = load_server_config(
        args.config, overrides={"database_url": args.database_url, "data_dir": args.data_dir}
    )
    if config.database_url.startswith("sqlite:///"):
        db_file = Path(config.database_url.removeprefix("sqlite:///"))
        if not db_file.is_file():
            raise InvalidArgument(f"no database at {db_file}", field="database_url")
    engine = open_database(config.database_url)
    try:
        result = export_repository(Store(engine), config.data_dir / "blobs", args.dir)
    finally:
        engine.dispose()
    console.print(
        f"exported to {args.dir}: {result.metadata_written} metadata and "
        f"{result.bundles_written} bundle file(s) written, {result.kept} already there; "
        f"timestamp v{result.timestamp_version}"
    )
    return 0


def repo_vcl(args: argparse.Namespace) -> int:
    from ota.delivery.varnish import LOOPBACK, render_vcl
    from ota.metrics import parse_listen

    try:
        host, port = parse_listen(args.origin)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{args.origin!r} is not HOST:PORT", field="origin") from exc
    try:
        vcl = render_vcl(host, port, token=args.token, purge_from=args.purge_from or LOOPBACK)
    except InvalidArgument as exc:
        if exc.field != "purge_from":
            raise
        raise InvalidArgument(exc.message, field="--purge-from") from exc
    print(vcl, end="")
    return 0


def repo_nginx(args: argparse.Namespace) -> int:
    from ota.delivery.nginx import DeviceCacheSettings, render_nginx

    settings = DeviceCacheSettings(
        listen=args.listen,
        server_cert=str(Path(args.cert).resolve()),
        server_key=str(Path(args.key).resolve()),
        device_ca=str(Path(args.device_ca).resolve()),
        crl=str(Path(args.crl).resolve()),
        origin=args.origin,
        origin_ca=str(Path(args.origin_ca).resolve()) if args.origin_ca else "",
        origin_name=args.origin_name,
        token=args.token,
        cache_dir=args.cache_dir,
    )
    print(render_nginx(settings), end="")
    return 0


def _wait_for_signal() -> str:
    """Block until SIGINT or SIGTERM; returns the signal's name."""
    stop = threading.Event()
    got: list[str] = []

    def handle(signum: int, _frame: object) -> None:
        got.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    stop.wait()
    return got[0] if got else "signal"


def dev(args: argparse.Namespace) -> int:
    from ota.devstack import DevStack

    stack = DevStack.start(
        args.state_dir,
        grpc_port=args.port,
        tls=args.tls,
        mtls=args.mtls,
        origin=True,
        dashboard_port=None if args.dashboard_port < 0 else args.dashboard_port,
    )
    try:
        env_file = stack.state_dir / "env"
        # Whole or absent: a script waiting for the file never reads half of it.
        partial = env_file.with_name("env.partial")
        partial.write_text(stack.env_lines())
        partial.replace(env_file)
        console.print(f"gRPC      {stack.server}")
        console.print(f"MQTT      {stack.mqtt_url}")
        console.print(f"metrics   {stack.metrics_url}")
        console.print(f"origin    {stack.origin_url}/  (TUF metadata and bundles over HTTP)")
        if stack.dashboard_url:
            console.print(f"dashboard {stack.dashboard_url} (sign in with the token below)")
        console.print(f"token     {stack.admin_token}")
        console.print(f"root      {stack.keys.root_json}")
        console.print(f"release   {stack.keys.release_key}")
        if stack.pki is not None:
            console.print(f"TLS CA    {stack.pki.ca_cert}")
            if stack.mtls:
                console.print(f"client    {stack.pki.client_cert} {stack.pki.client_key}")
        console.print(f"source {env_file} to point the CLI at it; Ctrl-C stops everything")
        _wait_for_signal()
    finally:
        stack.stop()
    return 0


def demo(args: argparse.Namespace) -> int:
    from ota.cli.demo import run_demo

    return run_demo(devices=args.devices, state_dir=args.state_dir)


def broker_config(args: argparse.Namespace) -> int:
    password = secrets.token_urlsafe(24)
    settings = BrokerSettings(
        port=args.port,
        bind_address=args.bind,
        topic_root=args.topic_root,
        tls_port=args.tls_port,
        tls_cafile=(
            str(args.device_ca.resolve())
            if args.device_ca
            else str(args.tls_ca.resolve())
            if args.tls_ca
            else None
        ),
        tls_require_certificate=args.device_ca is not None,
        tls_crlfile=str(args.crl.resolve()) if args.crl else None,
        tls_certfile=str(args.tls_cert.resolve()) if args.tls_cert else None,
        tls_keyfile=str(args.tls_key.resolve()) if args.tls_key else None,
        extra_control_usernames=tuple(args.replica),
        publish_connections=args.publish_connections,
        ingest_workers=args.ingest_workers,
        subscribe_guard=not args.no_subscribe_guard,
        subscribe_guard_plugin=(
            str(args.subscribe_guard_plugin.resolve()) if args.subscribe_guard_plugin else None
        ),
    )
    files = write_broker_config(args.out, settings, control_password=password)
    # Each replica has its own account: the username names its persistent session.
    # Its publishing connections' and ingest workers' accounts share its password.
    replicas = {name: secrets.token_urlsafe(24) for name in settings.extra_control_usernames}
    PasswordFile(files.password_file).set_many(
        {
            account: secret
            for name, secret in replicas.items()
            for account in settings.accounts_of(name)
        }
    )
    console.print(f"wrote {files.conf}, {files.acl_file}, {files.password_file}")
    if settings.subscribe_guard:
        console.print(
            f"subscription guard: {files.guard_plugin} "
            "(devices may subscribe only to their own desired topic)"
        )
    else:
        console.print(
            "[bold red]UNSAFE[/]: no subscription guard; a device's credentials can join "
            "the control plane's shared subscription and divert device events"
        )
    console.print(f"control plane account: {settings.control_username} / {password}")
    if settings.publish_connections > 1:
        console.print(
            f"publishing accounts (the same password as their control plane's): "
            f"USER-publish-2 .. USER-publish-{settings.publish_connections}"
        )
    for name, secret in replicas.items():
        console.print(f"replica account: {name} / {secret}")
    if settings.ingest_workers:
        console.print(
            f"ingest worker accounts: USER-ingest-1 to USER-ingest-{settings.ingest_workers} "
            "for each account above, with its password (ota serve's ingest_workers)"
        )
    console.print(f"start it with: mosquitto -c {files.conf}")
    return 0


def keys_device_ca(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from ota.trust.device_ca import DeviceCa, generate_device_ca

    now = datetime.now(UTC)
    paths = generate_device_ca(args.out, now=now)
    # Mosquitto will not start without its `crlfile`, and `ota serve` (which keeps it
    # with device_crl_file) will not start without the broker: the first one is made here.
    crl = Path(args.out) / "device-ca.crl"
    crl.write_bytes(DeviceCa.load(paths.cert, paths.key).crl([], now))
    console.print(f"device CA certificate {paths.cert} (to brokers and ota serve)")
    console.print(f"device CA key         {paths.key} (ota serve only; mode 0600)")
    console.print(
        f"first CRL             {crl} (valid 7 days: the broker's --crl file until "
        "ota serve's device_crl_file or `ota fleet crl` replaces it)"
    )
    return 0


def keys_generate(args: argparse.Namespace) -> int:
    paths = generate_keyring(
        args.out,
        root_keys=args.root_keys,
        root_threshold=args.root_threshold,
        release_keys=args.release_keys,
        release_threshold=args.release_threshold,
    )
    _say(
        f"root keys (offline, {args.root_threshold} of {args.root_keys} sign a new root): "
        + ", ".join(map(str, paths.root_keys))
    )
    _say(
        f"release keys (offline, one per engineer, {args.release_threshold} of "
        f"{args.release_keys} sign a bundle): " + ", ".join(map(str, paths.release_keys))
    )
    _say(
        f"online (control plane): {paths.snapshot_key}, {paths.timestamp_key}, {paths.director_key}"
    )
    _say(f"trust anchor for devices: {paths.root_json}")
    return 0


def keys_new(args: argparse.Namespace) -> int:
    for path in args.files:
        key = generate_key(path)
        _say(f"{path}  keyid {key.keyid}  public {public_key_path(path)}")
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("OTA_SERVER", "127.0.0.1:50051"),
        help="control plane address (env OTA_SERVER)",
    )
    p.add_argument(
        "--token", default=os.environ.get("OTA_TOKEN", ""), help="bearer token (env OTA_TOKEN)"
    )
    add_tls_options(p)
    p.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output for people (table) or scripts (json)",
    )


def keys_rotate_root(args: argparse.Namespace) -> int:

    def keys(paths: list[Path]) -> list[SSlibKey] | None:
        return [load_public_key(p) for p in paths] or None

    new_root_keys = keys([*args.new_key, *args.new_root_pub])
    change = RootChange(
        root_keys=new_root_keys,
        root_threshold=args.root_threshold,
        release_keys=keys(args.release_pub),
        release_threshold=args.release_threshold,
        snapshot_keys=keys(args.snapshot_pub),
        timestamp_keys=keys(args.timestamp_pub),
        director_keys=keys(args.director_pub),
    )
    trusted = None
    if args.trusted_root:
        try:
            trusted = args.trusted_root.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {args.trusted_root}: {exc.strerror}", field="trusted-root"
            ) from exc
    client = connect(args)
    try:
        plan = client.plan_root_rotation(
            change,
            root_keys=list(dict.fromkeys([*args.old_key, *args.new_key])),
            release_keys=args.release_key,
            expires_in=timedelta(days=args.expires_in_days),
            trusted_root=trusted,
        )
        if args.out:
            args.out.write_bytes(plan.new_root)
        lines = describe_rotation(plan.current_root, plan.new_root)
        if args.dry_run:
            if args.format == "json":
                emit_json({"changes": lines, "uploaded": False})
            else:
                _say("\n".join(["dry run, nothing uploaded:", *lines]))
            return 0
        result = client.rotate_root(plan)
    finally:
        client.close()
    if args.format == "json":
        emit_json(
            {
                "root_version": result.root_version,
                "targets_version": result.targets_version,
                "changes": lines,
            }
        )
    else:
        _say("\n".join(lines))
        _say(
            f"uploaded root v{result.root_version} (targets v{result.targets_version}); "
            "devices move to it on their next metadata refresh"
        )
    return 0


def describe_rotation(current: bytes, new: bytes) -> list[str]:
    """One line per role of root N+1: its keys and threshold, marking what changed."""
    old_md = parse_root(current, field="current_root").signed
    new_md = parse_root(new, field="new_root").signed

    def role_keys(root: Root, role: str) -> tuple[list[str], int]:
        if role == "director":
            spec = root.unrecognized_fields.get(DIRECTOR_FIELD, {})
            return list(spec.get("keyids", [])), int(spec.get("threshold", 1))
        return list(root.roles[role].keyids), root.roles[role].threshold

    lines = [f"root v{old_md.version} -> v{new_md.version}, expires {new_md.expires:%Y-%m-%d}"]
    for role in ("root", "targets", "snapshot", "timestamp", "director"):
        before, old_threshold = role_keys(old_md, role)
        after, threshold = role_keys(new_md, role)
        marks = [("+" if k not in before else " ") + k[:12] for k in after]
        marks += ["-" + k[:12] for k in before if k not in after]
        changed = "" if (before, old_threshold) == (after, threshold) else "  (changed)"
        name = "release" if role == "targets" else role
        lines.append(f"  {name:<10} {threshold} of {len(after)}: {' '.join(marks)}{changed}")
    return lines


def _say(text: str) -> None:
    console.print(text, soft_wrap=True, markup=False, highlight=False)
