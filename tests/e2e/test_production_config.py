"""A production configuration cannot silently go wrong: `ota serve` as a real subprocess.

Each refusal is one line on stderr naming what to fix, with a non-zero exit and
no traceback (`ota -v` shows it); a server that starts says in its first log
lines what it runs on, with no secret in them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

import ota
from ota.broker.process import free_port
from ota.client import Client
from ota.keyring import KeyPaths, generate_keyring
from ota.v1 import rollout_pb2
from tests.broker_harness import BrokerHandle, private_broker
from tests.e2e.processes import ControlPlaneProcess, serve_config

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TOKEN = "prod-config-admin-token"
SECRET = "hunter2-not-for-logs"


@pytest.fixture(scope="module")
def idle_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerHandle]:
    """A broker for configurations that are refused before they connect to one."""
    with private_broker(tmp_path_factory.mktemp("idle-broker")) as handle:
        yield handle


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPaths:
    out = tmp_path_factory.mktemp("keys") / "keys"
    generate_keyring(out)
    return KeyPaths.under(out)


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without any OTA_* setting that would fill a gap."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTA_")}
    return {**env, **extra}


def _ota(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ota"), *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one line on stderr, which it returns."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ota: error: "), lines[0]
    return lines[0]


def _config(tmp_path: Path, broker: BrokerHandle, keys: KeyPaths, **overrides: object) -> Path:
    """A serve config; `database_url=None` leaves the key out."""
    without = [k for k, v in overrides.items() if v is None]
    given = {k: v for k, v in overrides.items() if v is not None}
    listen = str(given.pop("listen", f"127.0.0.1:{free_port()}"))
    path = serve_config(tmp_path / "ota.toml", broker, keys, listen, TOKEN, **given)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(ln for ln in lines if ln.split(" =")[0] not in without) + "\n")
    return path


def test_serve_without_a_database_url_refuses_and_creates_nothing(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths
) -> None:
    config = _config(tmp_path, idle_broker, keys, database_url=None)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    line = _one_error_line(_ota("serve", "--config", str(config), cwd=workdir))
    assert "database_url: is required" in line
    assert "OTA_DATABASE_URL" in line and "--database-url" in line
    assert list(workdir.iterdir()) == []  # no ./ota.db beside a production broker session
    # Given by the environment instead, it is the one used.
    result = _ota(
        "serve",
        "--config",
        str(config),
        cwd=workdir,
        env=_env(OTA_DATABASE_URL=f"mysql://root@127.0.0.1:{free_port()}/ota"),
    )
    assert "mysql:// is not supported" in _one_error_line(result)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:{secret}@127.0.0.1:{closed}/ota", "cannot connect to PostgreSQL"),
        ("postgres://postgres:{secret}@127.0.0.1:{closed}/ota", "cannot connect to PostgreSQL"),
        ("mysql://root:{secret}@127.0.0.1:{closed}/ota", "mysql:// is not supported"),
        ("sqlite:////proc/ota-{closed}/ota.db", "cannot create /proc/ota-"),
        ("not a url", "is not a database URL"),
    ],
)
def test_an_unusable_database_is_one_line_with_the_fix(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths, url: str, expected: str
) -> None:
    url = url.format(secret=SECRET, closed=free_port())
    config = _config(tmp_path, idle_broker, keys, database_url=url)
    line = _one_error_line(_ota("serve", "--config", str(config), cwd=tmp_path))
    assert line.startswith("ota: error: database_url: ")
    assert expected in line
    assert SECRET not in line
    if "PostgreSQL" in expected:
        assert "running and reachable" in line and "127.0.0.1:" in line


def test_verbose_shows_where_a_database_error_came_from(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/ota"
    config = _config(tmp_path, idle_broker, keys, database_url=url)
    result = _ota("-v", "serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("ota: error: database_url: ")


@pytest.mark.postgres
def test_a_missing_postgres_database_names_createdb(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths, postgres_url: str
) -> None:
    url = make_url(postgres_url).set(database="ota_never_created_x9")
    config = _config(tmp_path, idle_broker, keys, database_url=url.render_as_string(False))
    line = _one_error_line(_ota("serve", "--config", str(config), cwd=tmp_path))
    assert "'ota_never_created_x9' does not exist" in line
    assert "createdb" in line and "ota_never_created_x9" in line


@pytest.mark.postgres
def test_a_postgres_user_that_may_not_create_tables_is_told_what_to_grant(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths, postgres_database: str
) -> None:
    role = f"ota_reader_{uuid.uuid4().hex[:8]}"
    admin = create_engine(postgres_database, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(text(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{role}"'))
    try:
        url = make_url(postgres_database).set(username=role, password=None)
        config = _config(tmp_path, idle_broker, keys, database_url=url.render_as_string(False))
        result = _ota("serve", "--config", str(config), cwd=tmp_path)
        assert result.returncode != 0
        errors = [ln for ln in result.stderr.splitlines() if " INFO " not in ln]
        assert len(errors) == 1, result.stderr
        assert f"GRANT CREATE ON SCHEMA public TO {role}" in errors[0]
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
        # The database (and with it the role's grants) goes with the fixture; the role now.
        with admin.connect() as conn:
            conn.execute(text(f'DROP ROLE "{role}"'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def serve_database(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(URL as an operator writes it, what the log must show). PostgreSQL is written
    `postgres://` with a password (the test server trusts local users, so it is ignored)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'data' / 'ota.db'}"
        return url, f"database {url}"
    fresh = make_url(request.getfixturevalue("postgres_database")).set(password=SECRET)
    written = fresh.render_as_string(False).replace("postgresql+psycopg://", "postgres://", 1)
    shown = fresh.set(drivername="postgresql+psycopg").render_as_string(hide_password=True)
    return written, f"database {shown}"


@contextmanager
def _serving(
    tmp_path: Path, broker: BrokerHandle, keys: KeyPaths, url: str
) -> Iterator[ControlPlaneProcess]:
    config = _config(tmp_path, broker, keys, database_url=url)
    listen = next(ln for ln in config.read_text().splitlines() if ln.startswith("listen"))
    plane = ControlPlaneProcess(config, listen.split('"')[1], TOKEN, tmp_path / "serve.log")
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def served(
    tmp_path: Path, broker: BrokerHandle, keys: KeyPaths, serve_database: tuple[str, str]
) -> Iterator[tuple[ControlPlaneProcess, str]]:
    url, shown = serve_database
    with _serving(tmp_path, broker, keys, url) as plane:
        yield plane, shown


def test_startup_names_database_broker_listen_replica_and_version(
    served: tuple[ControlPlaneProcess, str], broker: BrokerHandle
) -> None:
    plane, shown_database = served
    client = Client.connect(plane.server, TOKEN)
    try:  # it serves: `postgres://` was taken as PostgreSQL
        client.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), metadata=client.metadata)
    finally:
        client.close()
    log = plane.log.read_text()
    first = [ln for ln in log.splitlines() if " INFO " in ln][:4]
    assert f"ota {ota.__version__} starting as replica '{broker.control_username}'" in first[0]
    assert first[1].endswith(shown_database), first[1]
    assert first[2].endswith(f"broker {broker.url} as user '{broker.control_username}'")
    assert first[3].endswith(f"gRPC listen {plane.server} (plaintext)")
    assert "setup plugin" not in log  # alembic's plugin loading, at every start
    assert SECRET not in log and broker.control_password not in log
    assert TOKEN not in log


def test_the_cli_names_the_server_it_tried(
    tmp_path: Path, broker: BrokerHandle, keys: KeyPaths
) -> None:
    with _serving(tmp_path, broker, keys, f"sqlite:///{tmp_path / 'ota.db'}") as plane:
        _cli_against(plane, tmp_path)
        _second_serve_refused(plane, tmp_path)


def _second_serve_refused(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    """A second `ota serve` on the same address is refused before it touches the broker
    (gRPC would otherwise share the port and the second would take the broker session)."""
    result = _ota("serve", "--config", str(plane.config), cwd=tmp_path)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ota: error:")]
    assert errors == [
        f"ota: error: listen: cannot listen on {plane.server}: the address is in use "
        "(another `ota serve`?) or not this machine's"
    ], result.stderr
    assert "connected to the broker" not in result.stderr
    assert "lost the broker" not in plane.log.read_text()


def _cli_against(plane: ControlPlaneProcess, tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    line = _one_error_line(
        _ota("rollout", "list", "--server", closed, "--token", TOKEN, cwd=tmp_path)
    )
    assert f"UNAVAILABLE: cannot reach the control plane at {closed}" in line
    assert "is `ota serve` running there" in line

    line = _one_error_line(
        _ota(
            "rollout", "list", "--server", f"http://{plane.server}", "--token", TOKEN, cwd=tmp_path
        )
    )
    assert "has a URL scheme" in line and f"drop the scheme (--server {plane.server})" in line
    line = _one_error_line(
        _ota(
            "rollout",
            "list",
            "--server",
            f"https://{plane.server}/",
            "--token",
            TOKEN,
            cwd=tmp_path,
        )
    )
    assert f"(--server {plane.server} --tls)" in line

    # A TLS client against this plaintext port: the handshake fails, and the line says so.
    result = _ota(
        "rollout", "list", "--server", plane.server, "--tls", "--token", TOKEN, cwd=tmp_path
    )
    error = _one_error_line(result)
    assert f"cannot reach the control plane at {plane.server}" in error
    assert "TLS port" in error

    line = _one_error_line(
        _ota("rollout", "list", "--server", plane.server, "--token", "wrong", cwd=tmp_path)
    )
    assert line.startswith("ota: error: UNAUTHENTICATED") and f"(server {plane.server})" in line


@pytest.mark.parametrize(
    ("setting", "value", "field"),
    [
        ("engine_interval_seconds", 0, "engine_interval_seconds"),
        ("desired_state_ttl_seconds", -1, "desired_state_ttl_seconds"),
        ("ingest_batch_size", 0, "ingest_batch_size"),
        ("publish_poll_seconds", 0, "publish_poll_seconds"),
        ("listen", "127.0.0.1:70000", "listen"),
        ("tokens", "superuser", "tokens"),
    ],
)
def test_nonsense_settings_are_refused_at_start_naming_the_field(
    tmp_path: Path,
    idle_broker: BrokerHandle,
    keys: KeyPaths,
    *,
    setting: str,
    value: object,
    field: str,
) -> None:
    config = _config(tmp_path, idle_broker, keys, database_url=f"sqlite:///{tmp_path / 'ota.db'}")
    if setting == "tokens":
        config.write_text(config.read_text().replace('= "admin"', f'= "{value}"'))
    else:
        config = _config(
            tmp_path,
            idle_broker,
            keys,
            database_url=f"sqlite:///{tmp_path / 'ota.db'}",
            **{setting: value},
        )
    line = _one_error_line(_ota("serve", "--config", str(config), cwd=tmp_path))
    assert line.startswith(f"ota: error: {field}: "), line
    assert TOKEN not in line
    assert not (tmp_path / "ota.db").exists()  # refused before touching anything


def test_a_nonsense_setting_from_the_environment_is_refused_too(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths
) -> None:
    config = _config(tmp_path, idle_broker, keys, database_url=f"sqlite:///{tmp_path / 'ota.db'}")
    result = _ota(
        "serve", "--config", str(config), cwd=tmp_path, env=_env(OTA_ENGINE_INTERVAL_SECONDS="-0.5")
    )
    line = _one_error_line(result)
    assert line.startswith("ota: error: engine_interval_seconds: must be between 0.01 and 60")


def test_a_wrong_broker_password_is_refused_at_once_in_one_line(
    tmp_path: Path, idle_broker: BrokerHandle, keys: KeyPaths
) -> None:
    config = _config(
        tmp_path,
        idle_broker,
        keys,
        database_url=f"sqlite:///{tmp_path / 'ota.db'}",
        mqtt_password="not-the-password",
    )
    result = _ota("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 1
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ota: error:")]
    assert errors == [
        f"ota: error: the MQTT broker at 127.0.0.1:{idle_broker.port} refused the control "
        f"plane's connection as '{idle_broker.control_username}': Not authorized "
        "(check mqtt_username / mqtt_password)"
    ], result.stderr
    # The first refusal decides: no rounds of reconnecting before giving up.
    assert result.stderr.count("broker refused the control plane") == 1, result.stderr
