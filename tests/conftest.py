"""Fixtures over real parts: a private Mosquitto, a control plane on a real port, SQLite files.

The broker runs in a container when a Docker engine answers (testcontainers),
otherwise as a private `mosquitto` child process with the project's own
generated config (auth, ACL, persistence) on a free port. The shared broker on
1883 is never used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.devstack import BrokerEndpoint, DevStack
from tests.broker_harness import BrokerHandle, private_broker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with private_broker(tmp_path / "broker") as handle:
        yield handle


def endpoint(handle: BrokerHandle) -> BrokerEndpoint:
    return BrokerEndpoint(
        host=handle.host,
        port=handle.port,
        control_username=handle.control_username,
        control_password=handle.control_password,
        password_file=handle.files.password_file,
        reload=handle.reload,
    )


@pytest.fixture
def stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker))
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def postgres_url() -> str:
    url = os.environ.get("OTA_TEST_DATABASE_URL", "")
    if not url:
        pytest.skip("OTA_TEST_DATABASE_URL is not set (CI sets it)")
    return url
