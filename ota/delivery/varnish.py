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
Cache-Control (immutable files a year, timestamp.json a few seconds).
"""

from __future__ import annotations

from collections.abc import Sequence

from ota.errors import InvalidArgument


def render_vcl(
    origin_host: str,
    origin_port: int,
    *,
    token: str = "",
    purge_from: Sequence[str] = ("127.0.0.1", "::1"),
) -> str:
    for name, value in (("origin_host", origin_host), ("token", token)):
        if any(c in value for c in '"\n\r\\{}'):
            raise InvalidArgument("must not contain quotes, braces or newlines", field=name)
    acl = "".join(f'    "{address}";\n' for address in purge_from)
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
