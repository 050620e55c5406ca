"""`ota fleet register --agent-config FILE`: everything `ota-agent` needs for that device.

FILE may be a directory: the config is then ``agent.toml`` in it. With
``--identity certificate`` the file holds the one-time enrollment token
instead of a secret, and the addresses the agent needs for mutual TLS (the
device port, the broker's TLS listener, optionally the delivery origin).
The file holds the device's secret or token, so it is written with mode 0600, and the
trusted root is copied next to it (FILE's name with ``.root.json``), and the
CA of the control plane's certificate when there is one (``.ca.pem``), so those
files are what goes onto the device. Paths in the file are relative to
its directory, except the ones given as absolute paths.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from ota.agent.config import HOOK_NAMES, render_config
from ota.errors import InvalidArgument


def add_agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--agent-config",
        help="also write the ota-agent config file for this device (secret included, mode "
        "0600); a directory (existing, or written with a trailing /) gets DIR/agent.toml",
    )
    p.add_argument(
        "--root",
        default=os.environ.get("OTA_ROOT", ""),
        help="the trusted root.json to provision the device with (env OTA_ROOT)",
    )
    p.add_argument(
        "--broker", default="", help="broker URL the device uses (default: the server's)"
    )
    p.add_argument(
        "--agent-state-dir",
        default="/var/lib/ota-agent",
        help="the device's state directory (default /var/lib/ota-agent)",
    )
    p.add_argument(
        "--device-cert",
        default="",
        help="the device's own client certificate (PEM), where the control plane asks for mTLS",
    )
    p.add_argument("--device-key", default="", help="the device certificate's key (PEM)")
    p.add_argument(
        "--device-server",
        default="",
        metavar="HOST:PORT",
        help="with --identity certificate: the control plane's device port (device_listen)",
    )
    p.add_argument(
        "--origin-url",
        default="",
        metavar="URL",
        help="fetch TUF metadata and bundles over HTTP(S) from here (the delivery origin, a "
        "cache or a CDN) instead of gRPC",
    )
    p.add_argument(
        "--origin-ca",
        default="",
        metavar="PEM",
        help="the CA of the origin's HTTPS certificate (default: the system's CAs)",
    )
    p.add_argument(
        "--hooks-dir",
        default="",
        help="directory holding the device's hooks (install, activate, deactivate, rollback, "
        "health)",
    )


def check_agent_options(args: argparse.Namespace) -> None:
    """Before registering: a mistake here must not cost the device a secret shown nowhere."""
    if args.agent_config is None:
        return
    if not args.root:
        raise InvalidArgument(
            "--agent-config needs the trusted root.json (or OTA_ROOT)", field="root"
        )
    root = Path(args.root)
    if not root.is_file():
        raise InvalidArgument(f"{root} is not a file", field="root")
    if args.tls_ca and not Path(args.tls_ca).is_file():
        raise InvalidArgument(f"{args.tls_ca} is not a file", field="tls_ca")
    # A trailing "/" says "a directory", made when the config is written if missing
    # (its parent must exist); Path() would drop the "/".
    wants_dir = str(args.agent_config).endswith(("/", os.sep))
    args.agent_config = Path(args.agent_config)
    if args.agent_config.is_dir() or (wants_dir and not args.agent_config.exists()):
        args.agent_config = args.agent_config / "agent.toml"
    elif wants_dir:
        raise InvalidArgument(f"{args.agent_config} is not a directory", field="agent_config")
    parent = args.agent_config.resolve().parent
    if wants_dir:
        parent = parent.parent
    if not parent.is_dir():
        raise InvalidArgument(f"directory {parent} does not exist", field="agent_config")
    if bool(args.device_cert) != bool(args.device_key):
        raise InvalidArgument("a device certificate needs its key", field="device_cert")
    if args.broker and not args.broker.startswith(("mqtt://", "mqtts://")):
        raise InvalidArgument(
            f"must be an mqtt:// or mqtts:// URL, got {args.broker!r}", field="broker"
        )
    if args.origin_url and not args.origin_url.startswith(("http://", "https://")):
        raise InvalidArgument(
            f"must be an http:// or https:// URL, got {args.origin_url!r}", field="origin_url"
        )
    if args.origin_ca and not Path(args.origin_ca).is_file():
        raise InvalidArgument(f"{args.origin_ca} is not a file", field="origin_ca")
    if args.identity == "certificate":
        if ":" not in args.device_server:
            raise InvalidArgument(
                "a certificate device's agent needs the control plane's device port "
                "(device_listen) as HOST:PORT",
                field="device_server",
            )
        if args.device_cert:
            raise InvalidArgument(
                "a certificate device enrolls for its own certificate", field="device_cert"
            )
        if args.origin_url.startswith("http://"):
            raise InvalidArgument(
                "a certificate device presents its certificate over https:// only",
                field="origin_url",
            )


def write_agent_config(
    args: argparse.Namespace,
    *,
    device_id: str,
    secret: str,
    mqtt_url: str,
    labels: dict[str, str],
    enrollment_token: str = "",
) -> Path:
    """Write the config and the root beside it; returns the config's path.

    With `enrollment_token` (a certificate device) the config names no secret: the
    agent enrolls with the token on its first start."""
    config: Path = args.agent_config.resolve()
    config.parent.mkdir(mode=0o700, exist_ok=True)  # `--agent-config DIR/`
    root_copy = config.with_name(config.stem + ".root.json")
    shutil.copyfile(args.root, root_copy)
    tls: dict[str, str] = {}
    if args.tls_ca:
        # Public, like the root: copied so that the files beside the config are all it needs.
        ca_copy = config.with_name(config.stem + ".ca.pem")
        shutil.copyfile(args.tls_ca, ca_copy)
        tls["ca_file"] = ca_copy.name
    if args.device_cert:
        tls["cert_file"] = str(Path(args.device_cert).resolve())
        tls["key_file"] = str(Path(args.device_key).resolve())
    broker = args.broker or mqtt_url
    if args.tls_ca and broker.startswith("mqtts://"):
        tls["mqtt_ca_file"] = tls["ca_file"]  # the broker's certificate: the same CA
    if args.origin_ca:
        origin_ca = config.with_name(config.stem + ".origin-ca.pem")
        shutil.copyfile(args.origin_ca, origin_ca)
        tls["origin_ca_file"] = origin_ca.name
    hooks: dict[str, str] = {}
    if args.hooks_dir:
        hooks = {name: str(Path(args.hooks_dir) / name) for name in HOOK_NAMES}
    identity: dict[str, str] = (
        {
            "identity": "certificate",
            "enrollment_token": enrollment_token,
            "device_server": args.device_server,
        }
        if enrollment_token
        else {"secret": secret}
    )
    delivery = {"origin_url": args.origin_url} if args.origin_url else {}
    text = render_config(
        {
            "device_id": device_id,
            **identity,
            "server": args.server,
            "broker": broker,
            **delivery,
            "state_dir": args.agent_state_dir,
            "trusted_root": root_copy.name,
            "model": args.model,
            "region": args.region,
            "firmware": args.firmware,
            "health_interval_seconds": 300,
            "labels": labels,
            "tls": tls,
            "hooks": hooks,
        }
    )
    tmp = config.with_name(config.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, config)
    return config


def parse_labels(values: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidArgument(f"must be KEY=VALUE, got {item!r}", field="label")
        labels[key] = value
    return labels
