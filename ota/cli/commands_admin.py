"""Commands that run things locally: serve, dev, demo, keys, broker-config."""

from __future__ import annotations

import argparse
import secrets
import signal
import threading
from pathlib import Path
from typing import Any

from ota.broker.config import BrokerSettings, write_broker_config
from ota.cli.output import console
from ota.config import load_server_config
from ota.keyring import generate_keyring


def register(nouns: Any) -> None:
    p = nouns.add_parser("serve", help="run the control plane")
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument("--listen", help="gRPC listen address, e.g. 0.0.0.0:50051")
    p.add_argument("--database-url", help="sqlite:///ota.db or postgresql://...")
    p.add_argument("--mqtt-url", help="mqtt://host:port")
    p.set_defaults(handler=serve)

    p = nouns.add_parser("dev", help="a private broker + control plane for trying things")
    p.add_argument("--state-dir", type=Path, default=Path(".ota-dev"))
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.set_defaults(handler=dev)

    p = nouns.add_parser("demo", help="dev stack + simulated fleet + scripted rollouts")
    p.add_argument("--devices", type=int, default=1200)
    p.add_argument("--state-dir", type=Path, help="keep the demo's files here (default: temporary)")
    p.set_defaults(handler=demo)

    p = nouns.add_parser("broker-config", help="write a Mosquitto config, ACL and password file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--topic-root", default="ota/v1")
    p.set_defaults(handler=broker_config)

    keys = nouns.add_parser("keys", help="signing keys").add_subparsers(dest="verb", required=True)
    p = keys.add_parser("generate", help="root, release (offline) and online keys, root.json")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(handler=keys_generate)


def serve(args: argparse.Namespace) -> int:
    from ota.app import ControlPlane

    overrides = {
        "listen": args.listen,
        "database_url": args.database_url,
        "mqtt_url": args.mqtt_url,
    }
    config = load_server_config(args.config, overrides=overrides)
    plane = ControlPlane.build(config)
    plane.start()
    console.print(f"ota control plane serving on {config.listen} (port {plane.port})")
    _wait_for_signal()
    plane.stop()
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def dev(args: argparse.Namespace) -> int:
    from ota.devstack import DevStack

    stack = DevStack.start(args.state_dir, grpc_port=args.port)
    try:
        env_file = stack.state_dir / "env"
        env_file.write_text(stack.env_lines())
        console.print(f"gRPC      {stack.server}")
        console.print(f"MQTT      {stack.mqtt_url}")
        console.print(f"token     {stack.admin_token}")
        console.print(f"root      {stack.keys.root_json}")
        console.print(f"release   {stack.keys.release_key}")
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
    settings = BrokerSettings(port=args.port, bind_address=args.bind, topic_root=args.topic_root)
    files = write_broker_config(args.out, settings, control_password=password)
    console.print(f"wrote {files.conf}, {files.acl_file}, {files.password_file}")
    console.print(f"control plane account: {settings.control_username} / {password}")
    console.print(f"start it with: mosquitto -c {files.conf}")
    return 0


def keys_generate(args: argparse.Namespace) -> int:
    paths = generate_keyring(args.out)
    console.print(f"offline (keep with release engineers): {paths.root_key}, {paths.release_key}")
    console.print(
        f"online (control plane): {paths.snapshot_key}, {paths.timestamp_key}, {paths.director_key}"
    )
    console.print(f"trust anchor for devices: {paths.root_json}")
    return 0
