"""Building the broker's subscription guard, a small Mosquitto plugin shipped as C source.

Mosquitto's acl_file grants every SUBSCRIBE and only filters delivery, so a
device could join the control plane's shared subscription and take a share
of every device's events. The guard (guard/ota_subscribe_guard.c) refuses,
at SUBSCRIBE time, every filter a device asks for except its own desired
topic; the control plane's users are left to the acl_file.

The plugin is compiled with the system C compiler (``$CC``, else ``cc`` or
``gcc``) against the headers of Debian's ``mosquitto-dev`` and
``libmosquitto-dev`` packages. Builds are cached per user, keyed by the
source, the compiler and the headers, so private brokers (tests, ``ota dev``)
compile it once; each config directory gets its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from ota.errors import FailedPrecondition

PLUGIN_NAME = "ota_subscribe_guard.so"
_SOURCE = "ota_subscribe_guard.c"
_HEADERS = ("mosquitto.h", "mosquitto_broker.h", "mosquitto_plugin.h")
_INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
INSTALL_HINT = (
    "install a C compiler and Mosquitto's plugin headers "
    "(Debian/Ubuntu: apt-get install gcc mosquitto-dev libmosquitto-dev), "
    "or give `ota broker-config` one built elsewhere with --subscribe-guard-plugin"
)


def guard_source() -> bytes:
    """The plugin's C source, as shipped in the package."""
    return resources.files("ota.broker").joinpath("guard", _SOURCE).read_bytes()


def find_compiler() -> str:
    """The C compiler to use, or FailedPrecondition naming what to install."""
    wanted = os.environ.get("CC")
    for name in (wanted, "cc", "gcc") if wanted else ("cc", "gcc"):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise FailedPrecondition(
        f"the broker's subscription guard needs a C compiler and none was found; {INSTALL_HINT}"
    )


def _find_headers() -> list[Path]:
    found: list[Path] = []
    missing: list[str] = []
    for header in _HEADERS:
        path = next((d / header for d in _INCLUDE_DIRS if (d / header).is_file()), None)
        if path is None:
            missing.append(header)
        else:
            found.append(path)
    if missing:
        raise FailedPrecondition(
            f"the broker's subscription guard needs Mosquitto's headers "
            f"({', '.join(missing)} not found); {INSTALL_HINT}"
        )
    return found


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ota" / "broker-guard"


def build_guard_plugin(dest: Path) -> Path:
    """Compile (or take from the cache) the guard plugin and copy it to `dest`.

    Raises FailedPrecondition with one line naming what to install when the
    compiler or headers are missing, or quoting the compiler when it fails.
    """
    compiler = find_compiler()
    headers = _find_headers()
    source = guard_source()
    key = hashlib.sha256(source)
    key.update(compiler.encode())
    for header in headers:
        key.update(header.read_bytes())
    cached = _cache_dir() / key.hexdigest()[:32] / PLUGIN_NAME
    try:
        if not cached.is_file():
            _compile(compiler, source, cached)
    except OSError:
        # No writable cache (a service user without a home, say): build in place.
        _compile(compiler, source, dest)
        return dest
    _copy_atomically(cached, dest)
    return dest


def _compile(compiler: str, source: bytes, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ota-guard-") as tmp:
        src = Path(tmp) / _SOURCE
        src.write_bytes(source)
        built = Path(tmp) / PLUGIN_NAME
        result = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(built), str(src)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            first = next(
                (line for line in result.stderr.splitlines() if "error" in line),
                result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "",
            )
            raise FailedPrecondition(
                f"building the broker's subscription guard failed ({compiler}: {first}); "
                f"{INSTALL_HINT}"
            )
        # Concurrent builders (parallel tests) each rename a complete file into place.
        _copy_atomically(built, out)


def _copy_atomically(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, src.open("rb") as s:
            shutil.copyfileobj(s, f)
        os.chmod(tmp, 0o755)
        # A new inode: a running broker keeps the library it has mapped.
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
