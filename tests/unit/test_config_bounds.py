"""Every numeric setting of the server has bounds; a value outside them names the setting."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from ota.api.auth import OPERATORS
from ota.config import BOUNDS, TOKEN_ROLES, ServerConfig, load_server_config
from ota.errors import InvalidArgument
from ota.store.database import database_url, redacted

NUMERIC = [f.name for f in fields(ServerConfig) if f.type in ("int", "float")]


def test_every_numeric_setting_is_bounded() -> None:
    assert sorted(NUMERIC) == sorted(BOUNDS)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_bound_holds_at_its_edges_and_names_the_setting(name: str) -> None:
    bound = BOUNDS[name]
    # Related settings at their widest, so each edge is judged alone.
    base = ServerConfig(
        lease_duration_seconds=3600.0,
        lease_renew_seconds=0.1,
        webhook_retry_base_seconds=0.1,
        webhook_retry_max_seconds=7 * 24 * 3600.0,
    )
    for ok in (bound.low, bound.high):
        if name == "lease_duration_seconds" and ok <= base.lease_renew_seconds:
            continue
        if name == "lease_renew_seconds" and ok >= base.lease_duration_seconds:
            continue
        replace(base, **{name: type(getattr(base, name))(ok)})
    for bad in (bound.low - 1, bound.high + 1, float("nan"), float("inf")):
        with pytest.raises(InvalidArgument) as error:
            replace(base, **{name: bad})
        assert error.value.field == name
        assert f"between {bound.low:g} and {bound.high:g}" in str(error.value)


def test_related_settings_are_checked_together() -> None:
    with pytest.raises(InvalidArgument) as error:
        ServerConfig(lease_duration_seconds=5, lease_renew_seconds=5)
    assert error.value.field == "lease_renew_seconds"
    with pytest.raises(InvalidArgument) as error:
        ServerConfig(webhook_retry_base_seconds=60, webhook_retry_max_seconds=30)
    assert error.value.field == "webhook_retry_max_seconds"


def test_token_roles_are_the_operator_roles_and_others_are_refused(tmp_path: Path) -> None:
    assert set(TOKEN_ROLES) == OPERATORS
    file = tmp_path / "ota.toml"
    for entry in ("admin", "release:ci", "viewer:dash"):
        file.write_text(f'[tokens]\nt0k3n = "{entry}"\n')
        assert load_server_config(file, env={}).tokens == {"t0k3n": entry}
    for entry in ("root", "device", "", "Admin"):
        file.write_text(f'[tokens]\nt0k3n = "{entry}"\n')
        with pytest.raises(InvalidArgument) as error:
            load_server_config(file, env={})
        assert error.value.field == "tokens"
        assert "t0k3n" not in str(error.value)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("ingest_batch_size = 1.5", "ingest_batch_size"),
        ("ingest_batch_size = true", "ingest_batch_size"),
        ('engine_interval_seconds = "fast"', "engine_interval_seconds"),
        ("engine_interval_seconds = false", "engine_interval_seconds"),
        ('listen = "0.0.0.0"', "listen"),
        ('listen = "0.0.0.0:65536"', "listen"),
    ],
)
def test_values_of_the_wrong_kind_name_the_setting(tmp_path: Path, raw: str, field: str) -> None:
    file = tmp_path / "ota.toml"
    file.write_text(raw + "\n")
    with pytest.raises(InvalidArgument) as error:
        load_server_config(file, env={})
    assert error.value.field == field


def test_a_malformed_secret_is_not_echoed(tmp_path: Path) -> None:
    file = tmp_path / "ota.toml"
    for raw, field in (
        ('tokens = ["t0k3n"]', "tokens"),
        ('mqtt_password = ["pa55"]', "mqtt_password"),
    ):
        file.write_text(raw + "\n")
        with pytest.raises(InvalidArgument) as error:
            load_server_config(file, env={})
        assert error.value.field == field
        assert "t0k3n" not in str(error.value) and "pa55" not in str(error.value)


def test_postgres_urls_are_spelled_for_the_driver_and_passwords_never_shown() -> None:
    for written in ("postgres://u:pw@db:5432/ota", "postgresql://u:pw@db:5432/ota"):
        assert database_url(written).drivername == "postgresql+psycopg"
        assert redacted(written) == "postgresql+psycopg://u:***@db:5432/ota"
    assert database_url("sqlite:///x.db").drivername == "sqlite"
    assert "pw" not in redacted("mysql://u:pw@db/ota")
    for bad in ("", "   ", "mysql://u@db/ota", "nonsense"):
        with pytest.raises(InvalidArgument) as error:
            database_url(bad)
        assert error.value.field == "database_url"
