"""Fixtures over real parts: a private Mosquitto, a control plane on a real port, SQLite files,
and a fresh PostgreSQL database per test when OTA_TEST_DATABASE_URL is set.

The broker runs in a container when a Docker engine answers (testcontainers),
otherwise as a private `mosquitto` child process with the project's own
generated config (auth, ACL, persistence) on a free port. The shared broker on
1883 is never used.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from xdist.scheduler import LoadFileScheduling

from ota.devstack import BrokerEndpoint, DevStack
from tests.broker_harness import BrokerHandle, private_broker

# `make test` runs the suite on two workers (pytest-xdist, `--dist loadfile`): a test
# file stays whole on one worker, so what its tests share per module (a wheel build,
# a stack shared by a module's checks) is set up once. The longest files (minutes
# each: hundreds of devices, control-plane kills, a benchmark run) are one unit:
# they run one after another on one worker, never beside each other, and first,
# while the other worker takes the short ones.
HEAVY = frozenset(
    {
        "tests/e2e/test_bench_smoke.py",
        "tests/e2e/test_control_plane_restart.py",
        "tests/e2e/test_rollout_chaos.py",
    }
)


def _test_file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Stable: the heavy files first, everything else in its usual order.
    items.sort(key=lambda item: _test_file(item.nodeid) not in HEAVY)


class _SuiteScheduling(LoadFileScheduling):  # type: ignore[misc]
    """One work unit per test file, and one for all the HEAVY files together."""

    def _split_scope(self, nodeid: str) -> str:
        path = _test_file(nodeid)
        return "heavy" if path in HEAVY else path


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") == "loadfile":
        return _SuiteScheduling(config, log)
    return None


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


@contextmanager
def fresh_postgres_database(postgres_url: str) -> Iterator[str]:
    """The URL of a new, uniquely named PostgreSQL database, dropped on exit.

    OTA_TEST_DATABASE_URL is only the admin connection that creates and drops
    it, so concurrent runs (and tests) never share a schema.
    """
    admin_url = make_url(postgres_url).set(drivername="postgresql+psycopg")
    name = f"{admin_url.database or 'ota'}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE ends connections a failed test (or a killed child process) left open.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def postgres_database(postgres_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database of each kind the store supports: a SQLite file, PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ota.db'}"
    url: str = request.getfixturevalue("postgres_database")
    return url
