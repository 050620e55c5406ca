"""An nginx configuration for a shared cache that ends the devices' mutual TLS.

For fleets of certificate devices behind a cache (docs/DECISIONS.md, "Mutual
TLS on the delivery origin"): nginx demands a certificate of the device CA,
checks it against the CRL the control plane keeps (`device_crl_file` or
`ota fleet crl`; re-read on reload), and fetches from the origin with the
fleet's delivery token, so the origin's only client is the cache and one copy
serves the fleet. A revoked device is refused at its next handshake once
nginx has re-read the CRL; `keepalive_timeout` bounds how long a connection
opened before lives.

What else it does, and why:

- The cache key is the path alone: every device and host name share a copy.
- Lifetimes are the origin's ``Cache-Control`` (immutable files a year,
  ``timestamp.json`` a few seconds).
- Concurrent misses wait for one fetch (``proxy_cache_lock``).
- Anything but GET and HEAD is refused: the origin is read-only.

The output goes inside nginx's ``http`` block (e.g. ``/etc/nginx/conf.d/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ota.errors import InvalidArgument


@dataclass(frozen=True)
class DeviceCacheSettings:
    listen: str  # nginx `listen` address, e.g. "443" or "0.0.0.0:8443"
    server_cert: str  # the cache's HTTPS certificate chain (PEM), as devices see it
    server_key: str
    device_ca: str  # the device CA's certificate (`ota keys device-ca`)
    crl: str  # the device CA's CRL, kept current (`ota fleet crl` or device_crl_file)
    origin: str  # the origin's host:port (`origin_listen`)
    origin_ca: str = ""  # the CA of the origin's HTTPS certificate; empty = plain HTTP
    # The DNS name the origin's certificate carries; empty = the origin's host. nginx
    # checks a DNS name only, so an origin addressed by IP needs one here.
    origin_name: str = ""
    token: str = ""  # the fleet's delivery token (`origin_token`)
    cache_dir: str = "/var/cache/nginx/ota"
    keepalive_seconds: int = 60

    def __post_init__(self) -> None:
        for name in (
            "listen",
            "server_cert",
            "server_key",
            "device_ca",
            "crl",
            "origin",
            "origin_ca",
            "origin_name",
            "token",
            "cache_dir",
        ):
            value = getattr(self, name)
            if any(c in value for c in "\"';{}\\ \t\r\n$#"):
                raise InvalidArgument(
                    "must not contain quotes, spaces, braces, ';', '$' or '#'", field=name
                )
        for name in ("listen", "server_cert", "server_key", "device_ca", "crl", "origin"):
            if not getattr(self, name):
                raise InvalidArgument("is required", field=name)
        if ":" not in self.origin:
            raise InvalidArgument(f"must be HOST:PORT, got {self.origin!r}", field="origin")
        if not 1 <= self.keepalive_seconds <= 3600:
            raise InvalidArgument("must be 1 to 3600 seconds", field="keepalive_seconds")


def render_nginx(s: DeviceCacheSettings) -> str:
    """The ``http``-level configuration: the cache zone, the origin, the devices' server."""
    https = bool(s.origin_ca)
    origin_host = s.origin_name or s.origin.rsplit(":", 1)[0].strip("[]")
    upstream_tls = (
        f"""        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {s.origin_ca};
        proxy_ssl_server_name on;
        proxy_ssl_name {origin_host};
        proxy_ssl_session_reuse on;
"""
        if https
        else ""
    )
    token = f'        proxy_set_header Authorization "Bearer {s.token}";\n' if s.token else ""
    return f"""# ota: a shared cache in front of the delivery origin for certificate devices.
proxy_cache_path {s.cache_dir} levels=1:2 keys_zone=ota_delivery:10m max_size=10g inactive=30d use_temp_path=off;

upstream ota_origin {{
    server {s.origin};
    keepalive 16;
}}

server {{
    listen {s.listen} ssl;
    ssl_certificate {s.server_cert};
    ssl_certificate_key {s.server_key};
    # Devices only: a certificate of the device CA that its CRL does not list.
    ssl_client_certificate {s.device_ca};
    ssl_verify_client on;
    ssl_verify_depth 1;
    ssl_crl {s.crl};
    # The CRL is checked at the handshake: this bounds how long a connection
    # opened before a revocation keeps being served.
    keepalive_timeout {s.keepalive_seconds}s;

    location / {{
        limit_except GET {{ deny all; }}
        proxy_pass {"https" if https else "http"}://ota_origin;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $proxy_host;
{token}{upstream_tls}        proxy_cache ota_delivery;
        proxy_cache_key $uri;
        proxy_cache_lock on;
        proxy_cache_use_stale updating;
        add_header X-Cache-Status $upstream_cache_status always;
    }}
}}
"""
