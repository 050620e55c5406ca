"""A Varnish configuration (VCL) for a shared cache in front of the delivery origin.

What it changes from Varnish's built-in behaviour, and why:

- Requests with an ``Authorization`` header are cached (built-in: passed to the
  origin). With a fleet delivery token the cache checks it and keeps one copy
  for the whole fleet; the header still goes to the origin on a miss, so an
  origin with the same token accepts it.
- The cache key is the URL alone: every host name a fleet uses shares one copy.
- ``PURGE`` from the listed addresses drops one URL (an operator removing a bad
  object, docs/OPERATIONS.md).
- Anything but GET and HEAD is refused: the origin is read-only.

Range requests need nothing: Varnish fetches the whole object on a miss,
streams it, and answers each Range from it. Lifetimes are the origin's
Cache-Control (immutable files a year, timestamp.json a few seconds, the next
root's 404 `origin_next_root_max_age` where the control plane purges it); Varnish
keeps a 404 for its max-age as it keeps a 200. Requests for an object being
fetched wait for that one fetch (Varnish's waiting list), and an expired object
is served for up to Varnish's default grace (10 s) while one background fetch
renews it: a fleet asking for the timestamp at once costs the origin one
request per lifetime either way.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ota.broker.process import free_port, port_accepts
from ota.errors import InvalidArgument, Unavailable

LOOPBACK = ("127.0.0.1", "::1")


def render_vcl(
    origin_host: str,
    origin_port: int,
    *,
    token: str = "",
    purge_from: Sequence[str] = LOOPBACK,
) -> str:
    for name, value in (("origin_host", origin_host), ("token", token)):
        if any(c in value for c in '"\n\r\\{}'):
            raise InvalidArgument("must not contain quotes, braces or newlines", field=name)
    acl = "".join(_acl_entry(address) for address in purge_from)
    check = (
        f"""    if (req.http.Authorization != "Bearer {token}") {{
        return (synth(401, "a delivery token is required"));
    }}
"""
        if token
        else ""
    )
    return f"""vcl 4.1;

backend origin {{
    .host = "{origin_host}";
    .port = "{origin_port}";
    .connect_timeout = 5s;
    .first_byte_timeout = 30s;
    .between_bytes_timeout = 30s;
}}

acl purgers {{
{acl}}}

sub vcl_recv {{
    if (req.method == "PURGE") {{
        if (client.ip !~ purgers) {{
            return (synth(405, "not allowed"));
        }}
        return (purge);
    }}
    if (req.method != "GET" && req.method != "HEAD") {{
        return (synth(405, "read-only"));
    }}
{check}    unset req.http.Cookie;
    return (hash);
}}

sub vcl_hash {{
    hash_data(req.url);
    return (lookup);
}}

sub vcl_backend_response {{
    set beresp.do_stream = true;
    # A 5xx is the origin's trouble, not the file's: never keep it.
    if (beresp.status >= 500) {{
        set beresp.uncacheable = true;
        set beresp.ttl = 0s;
        return (deliver);
    }}
}}
"""


def _acl_entry(address: str) -> str:
    """One line of the purgers ACL: an address, or a network as `10.0.0.0/24`."""
    try:
        network = ipaddress.ip_network(address.strip(), strict=False)
    except ValueError as exc:
        raise InvalidArgument(
            f"give an IP address or network, got {address!r}", field="purge_from"
        ) from exc
    if network.num_addresses == 1:
        return f'    "{network.network_address}";\n'
    return f'    "{network.network_address}"/{network.prefixlen};\n'


_FALLBACK_BINARY = "/usr/sbin/varnishd"  # Debian puts it outside a user's PATH


def find_varnishd() -> str:
    """The path of varnishd, or a clear error saying how to install it."""
    found = shutil.which("varnishd")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise Unavailable(
        "varnishd is not installed (looked on PATH and in /usr/sbin); "
        "install it with `apt-get install varnish`"
    )


@dataclass
class VarnishProcess:
    """A private varnishd in the foreground, on a free loopback port (benchmarks and tests).

    ``-j none``: no privilege separation, so it runs as whoever started it, with
    its working directory under `work_dir`; nobody else's cache is touched.
    """

    work_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        work_dir: Path,
        origin_host: str,
        origin_port: int,
        *,
        token: str = "",
        port: int | None = None,
    ) -> VarnishProcess:
        """`port`: listen there (chosen beforehand, e.g. to give the control plane as
        the cache it purges); a free one by default."""
        work_dir.mkdir(parents=True, exist_ok=True)
        vcl = work_dir / "ota.vcl"
        vcl.write_text(render_vcl(origin_host, origin_port, token=token))
        port = port or free_port()
        log_path = work_dir / "varnishd.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    find_varnishd(),
                    "-F",
                    "-j",
                    "none",
                    "-a",
                    f"127.0.0.1:{port}",
                    "-T",
                    "127.0.0.1:0",
                    "-f",
                    str(vcl.resolve()),
                    "-n",
                    str((work_dir / "instance").resolve()),
                    "-s",
                    "malloc,256m",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        varnish = cls(work_dir / "instance", port, process)
        deadline = time.monotonic() + 60
        while not port_accepts("127.0.0.1", port):
            if process.poll() is not None:
                raise Unavailable(
                    f"varnishd exited with {process.returncode}: {log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                varnish.stop()
                raise Unavailable("varnishd did not accept connections within 60 s")
            time.sleep(0.05)
        return varnish

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
