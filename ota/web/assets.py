"""Templates and static assets, shared by the dashboard and the HTML report file.

Assets are read once from the package and served under content-hashed names
(`ota.3f9c2a1b04de.css`), so a browser may cache them for good: a new release
changes the name, not the cached bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

import jinja2

_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# Served to browsers, in this order within a page.
SCRIPTS = ("uplot.min.js", "charts.js")
STYLES = ("uplot.min.css", "ota.css")


@dataclass(frozen=True)
class Asset:
    name: str  # as in the package
    hashed: str  # as served
    body: bytes
    content_type: str


@cache
def assets() -> dict[str, Asset]:
    """Every static asset by its package name."""
    out: dict[str, Asset] = {}
    for entry in resources.files("ota.web").joinpath("static").iterdir():
        stem, dot, ext = entry.name.rpartition(".")
        if f".{ext}" not in _TYPES:
            continue
        body = entry.read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:12]
        out[entry.name] = Asset(entry.name, f"{stem}.{digest}{dot}{ext}", body, _TYPES[f".{ext}"])
    return out


def text(name: str) -> str:
    return assets()[name].body.decode()


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("ota.web", "templates"),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
