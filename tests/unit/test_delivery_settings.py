"""Choosing HTTP delivery: a simulator configured wrongly says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_sim.cli import main
from device_sim.fleet import FleetSettings
from device_sim.profile import FailureProfile
from ota.delivery.varnish import render_vcl
from ota.errors import InvalidArgument


def settings(**kw: str) -> FleetSettings:
    return FleetSettings(
        server="127.0.0.1:1",
        admin_token="t",
        trusted_root=b"{}",
        state_dir=Path("/nonexistent"),
        failures=FailureProfile(),
        **kw,  # type: ignore[arg-type]
    )


def test_http_delivery_needs_an_http_url() -> None:
    assert settings(delivery="http", origin_url="https://cdn.example").origin_url
    for bad in ("", "cdn.example", "ftp://cdn.example"):
        with pytest.raises(InvalidArgument) as refused:
            settings(delivery="http", origin_url=bad)
        assert refused.value.field == "origin_url"
    with pytest.raises(InvalidArgument) as refused:
        settings(delivery="carrier-pigeon")
    assert refused.value.field == "delivery"


def test_ota_sim_says_what_is_missing_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root.json"
    root.write_text("{}")
    code = main(["run", "--devices", "1", "--root", str(root), "--delivery", "http"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "origin_url" in err and "http://" in err


def test_the_vcl_refuses_values_that_would_break_out_of_a_string() -> None:
    vcl = render_vcl("origin.internal", 8443, token="abc")
    assert '.host = "origin.internal";' in vcl and '"Bearer abc"' in vcl
    assert "Authorization" not in render_vcl("origin.internal", 8443)
    for bad in ('a"b', "a\nb", "a}b"):
        with pytest.raises(InvalidArgument):
            render_vcl("origin", 1, token=bad)


def test_origin_device_certificates_need_origin_tls_and_the_device_ca() -> None:
    from ota.config import ServerConfig

    base = {"database_url": "sqlite://", "origin_listen": "127.0.0.1:0"}
    for missing in (
        {},
        {"origin_tls_cert_file": "o.pem", "origin_tls_key_file": "o.key"},
        {"device_ca_cert_file": "ca.pem", "device_ca_key_file": "ca.key"},
    ):
        with pytest.raises(InvalidArgument) as refused:
            ServerConfig(**base, **missing, origin_device_certificates=True)  # type: ignore[arg-type]
        assert refused.value.field == "origin_device_certificates"
    ServerConfig(
        **base,  # type: ignore[arg-type]
        origin_tls_cert_file="o.pem",
        origin_tls_key_file="o.key",
        device_ca_cert_file="ca.pem",
        device_ca_key_file="ca.key",
        origin_device_certificates=True,
    )


def test_the_nginx_config_refuses_values_that_would_break_out_of_a_directive() -> None:
    from ota.delivery.nginx import DeviceCacheSettings, render_nginx

    good = {
        "listen": "443",
        "server_cert": "/etc/nginx/ota.pem",
        "server_key": "/etc/nginx/ota.key",
        "device_ca": "/etc/ota/device-ca.pem",
        "crl": "/etc/ota/device-ca.crl",
        "origin": "origin.internal:8443",
        "origin_ca": "/etc/ota/ca.pem",
        "token": "abc",
    }
    conf = render_nginx(DeviceCacheSettings(**good))
    assert "ssl_verify_client on;" in conf and "ssl_crl /etc/ota/device-ca.crl;" in conf
    assert 'proxy_set_header Authorization "Bearer abc";' in conf
    assert "proxy_ssl_name origin.internal;" in conf and "proxy_pass https://" in conf
    plain = render_nginx(DeviceCacheSettings(**{**good, "origin_ca": "", "token": ""}))
    assert "proxy_pass http://" in plain and "Authorization" not in plain
    for field, bad in (
        ("token", 'a"b'),
        ("crl", "/x;y"),
        ("server_cert", "a b"),
        ("origin", "nohost"),
        ("device_ca", ""),
    ):
        with pytest.raises(InvalidArgument) as refused:
            DeviceCacheSettings(**{**good, field: bad})
        assert refused.value.field == field


def test_the_vcl_lets_the_listed_addresses_and_networks_purge_and_nothing_else() -> None:
    vcl = render_vcl("origin", 1, purge_from=["10.0.0.5", "10.1.0.0/16", "::1"])
    acl = vcl.split("acl purgers {", 1)[1].split("}", 1)[0]
    assert acl.split() == ['"10.0.0.5";', '"10.1.0.0"/16;', '"::1";']
    for bad in ('x";', "10.0.0.0/33", "", "origin.internal"):
        with pytest.raises(InvalidArgument) as caught:
            render_vcl("origin", 1, purge_from=[bad])
        assert caught.value.field == "purge_from"
