"""The agent's TOML file: relative paths, and a mistake named by its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ota.agent.config import load_config, parse_config, render_config
from ota.errors import InvalidArgument

GOOD = {
    "device_id": "car-1",
    "secret": "s3cret",
    "server": "ota.example.com:50051",
    "broker": "mqtts://broker.example.com",
    "state_dir": "state",
    "trusted_root": "root.json",
    "model": "ev6",
    "firmware": "4.2.0",
    "labels": {"fleet": "internal"},
    "tls": {"ca_file": "/etc/ota/ca.pem"},
    "hooks": {"install": "hooks/install", "timeout_seconds": 30},
}


def test_a_written_config_reads_back_with_paths_relative_to_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(render_config(GOOD))
    config = load_config(path)
    assert config.state_dir == tmp_path / "state"
    assert config.trusted_root == tmp_path / "root.json"
    assert config.hooks.paths["install"] == tmp_path / "hooks" / "install"
    assert config.hooks.paths["rollback"] is None
    assert config.hooks.timeout_seconds == 30
    assert config.broker_host_port == ("broker.example.com", 8883)
    assert config.grpc_tls is not None and config.grpc_tls.ca_file == Path("/etc/ota/ca.pem")
    assert config.mqtt_tls is not None and config.mqtt_tls.ca_file is None  # system CAs
    assert config.labels == {"fleet": "internal"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"server": "nohost"}, "server"),
        ({"broker": "http://x"}, "broker"),
        ({"firmware": "four"}, "firmware"),
        ({"colour": "red"}, "colour"),
        ({"hooks": {"instal": "x"}}, "hooks.instal"),
        ({"hooks": {"timeout_seconds": 0}}, "hooks.timeout_seconds"),
        ({"tls": {"cert_file": "c.pem"}}, "tls.cert_file"),
        ({"health_interval_seconds": "often"}, "health_interval_seconds"),
        ({"log_format": "xml"}, "log_format"),
        ({"secret_file": "s"}, "secret"),
    ],
)
def test_a_mistake_names_its_key(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_config({**GOOD, **change}, base=Path("/"))
    assert err.value.field == field


def test_ota_agent_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(render_config({**GOOD, "broker": "tcp://x"}))
    proc = subprocess.run(
        [sys.executable, "-m", "ota.agent.cli", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ota-agent: error: broker: must be mqtt://")
    assert len(proc.stderr.strip().splitlines()) == 1
    missing = subprocess.run(
        [sys.executable, "-m", "ota.agent.cli", "--config", str(tmp_path / "none.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("ota-agent: error: config: cannot read")


CERTIFICATE = {
    **{k: v for k, v in GOOD.items() if k != "secret"},
    "identity": "certificate",
    "enrollment_token": "tok",
    "device_server": "ota.example.com:50052",
    "origin_url": "https://cdn.example.com",
    "tls": {"ca_file": "ca.pem", "mqtt_ca_file": "ca.pem", "origin_ca_file": "cdn-ca.pem"},
}


def test_a_certificate_device_reads_its_token_and_addresses(tmp_path: Path) -> None:
    config = parse_config(CERTIFICATE, base=tmp_path)
    assert config.certificate and config.secret == ""
    assert config.enrollment_token == "tok"
    assert config.device_server == "ota.example.com:50052"
    assert config.identity_dir == tmp_path / "state" / "identity"
    assert config.origin_url == "https://cdn.example.com"
    assert config.origin_ca_file == tmp_path / "cdn-ca.pem"
    # A device provisioned with its certificate at the factory needs no token.
    without = {k: v for k, v in CERTIFICATE.items() if k != "enrollment_token"}
    assert parse_config(without, base=tmp_path).enrollment_token == ""


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"identity": "smartcard"}, "identity"),
        ({"secret": "s"}, "secret"),
        ({"device_server": "nohost"}, "device_server"),
        ({"broker": "mqtt://broker.example.com"}, "broker"),
        ({"origin_url": "http://cdn.example.com"}, "origin_url"),
        ({"origin_url": "cdn.example.com"}, "origin_url"),
        ({"tls": {"cert_file": "c.pem", "key_file": "k.pem"}}, "tls.cert_file"),
        ({"enrollment_token_file": "t"}, "enrollment_token"),
    ],
)
def test_a_certificate_device_mistake_names_its_key(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_config({**CERTIFICATE, **change}, base=Path("/"))
    assert err.value.field == field


def test_a_password_device_refuses_certificate_keys() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_config({**GOOD, "enrollment_token": "tok"}, base=Path("/"))
    assert err.value.field == "enrollment_token"


def test_an_unquoted_version_is_named_as_a_string_to_quote() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_config({**GOOD, "firmware": 4.2}, base=Path("/"))
    assert str(err.value) == 'firmware: must be a string in quotes, got 4.2: write firmware = "4.2"'


def _agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ota.agent.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_refuses_the_files_a_start_would_refuse(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "install").write_text("#!/bin/sh\n")
    (hooks / "install").chmod(0o755)
    (tmp_path / "root.json").write_text("{}")
    good = {**GOOD, "tls": {}, "hooks": {"install": "hooks/install"}}
    (tmp_path / "agent.toml").write_text(render_config(good))
    ok = _agent("--config", str(tmp_path), "--check")  # the directory: its agent.toml
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{tmp_path / 'agent.toml'}: ok (device car-1)"

    (tmp_path / "agent.toml").write_text(render_config({**good, "trusted_root": "nope.json"}))
    missing = _agent("--config", str(tmp_path / "agent.toml"), "--check")
    assert missing.returncode == 2
    assert missing.stderr == (
        f"ota-agent: error: trusted_root: {tmp_path / 'nope.json'} is not a file\n"
    )

    (hooks / "install").chmod(0o644)
    (tmp_path / "agent.toml").write_text(render_config(good))
    stale = _agent("--config", str(tmp_path / "agent.toml"), "--check")
    assert stale.returncode == 2
    assert stale.stderr == (
        f"ota-agent: error: hooks.install: {hooks / 'install'} is not executable\n"
    )
