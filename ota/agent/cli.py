"""`ota-agent --config FILE`: run the agent for this device until SIGTERM.

Logs go to stdout (journald takes them from there), as text or one JSON
object a line. A mistake in the config file is one line on stderr and exit
status 2; the agent never exits because of a hook.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ota.errors import OtaError
from ota.logs import TEXT_FORMAT, JsonFormatter

if TYPE_CHECKING:
    from ota.agent.runtime import Agent

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ota-agent", description="Follow this device's ota rollouts through its hooks."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("OTA_AGENT_CONFIG", "/etc/ota-agent/agent.toml")),
        help="the agent's TOML file, or the directory holding it as agent.toml "
        "(default: $OTA_AGENT_CONFIG or /etc/ota-agent/agent.toml)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), help="overrides the config")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the config file and the files it names, and exit",
    )
    args = parser.parse_args(argv)

    from ota.agent.config import check_files, load_config

    if args.config.is_dir():
        # `ota fleet register --agent-config DIR` writes DIR/agent.toml.
        args.config = args.config / "agent.toml"
    try:
        config = load_config(args.config)
        if args.check:
            check_files(config)
    except OtaError as exc:
        print(f"ota-agent: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logging(
        args.log_format or config.log_format, verbose=args.verbose, device_id=config.device_id
    )
    if args.check:
        print(f"{args.config}: ok (device {config.device_id})")
        return 0

    # From here on SIGTERM is a clean stop, even while the agent is still starting.
    stopping: list[int] = []
    agent: Agent | None = None

    def stop(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)
        if agent is not None:
            agent.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    from ota.agent.identity import EnrollmentStopped, load_or_enroll
    from ota.agent.runtime import Agent

    def pause(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while not stopping and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))
        return bool(stopping)

    # Once more after each certificate renewal: every connection then uses the new one.
    while True:
        try:
            identity = load_or_enroll(config, pause=pause) if config.certificate else None
            agent = Agent(config, identity=identity)
        except EnrollmentStopped:
            return 0
        except OtaError as exc:
            print(f"ota-agent: error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if stopping:
            agent.request_stop()
        if not agent.run() or stopping:
            return 0


def _configure_logging(log_format: str, *, verbose: bool, device_id: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_DeviceId(device_id))
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Libraries speak up only when something is wrong.
    for noisy in ("tuf", "securesystemslib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _DeviceId(logging.Filter):
    """Every line names the device: a JSON log collector may gather a whole fleet's."""

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self._device_id = device_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "device_id", None) is None:
            record.device_id = self._device_id
        return True


if __name__ == "__main__":
    sys.exit(main())
