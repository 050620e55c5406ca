"""`ota fleet register --agent-config FILE`: everything `ota-agent` needs for that device.

The file holds the device's secret, so it is written with mode 0600, and the
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
        type=Path,
        help="also write the ota-agent config file for this device (secret included, mode 0600)",
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
    parent = args.agent_config.resolve().parent
    if not parent.is_dir():
        raise InvalidArgument(f"directory {parent} does not exist", field="agent_config")
    if bool(args.device_cert) != bool(args.device_key):
        raise InvalidArgument("a device certificate needs its key", field="device_cert")
    if args.broker and not args.broker.startswith(("mqtt://", "mqtts://")):
        raise InvalidArgument(
            f"must be an mqtt:// or mqtts:// URL, got {args.broker!r}", field="broker"
        )


def write_agent_config(
    args: argparse.Namespace, *, device_id: str, secret: str, mqtt_url: str, labels: dict[str, str]
) -> Path:
    """Write the config and the root beside it; returns the config's path."""
    config: Path = args.agent_config.resolve()
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
    hooks: dict[str, str] = {}
    if args.hooks_dir:
        hooks = {name: str(Path(args.hooks_dir) / name) for name in HOOK_NAMES}
    text = render_config(
        {
            "device_id": device_id,
            "secret": secret,
            "server": args.server,
            "broker": args.broker or mqtt_url,
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
