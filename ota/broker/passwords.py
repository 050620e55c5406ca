"""Mosquitto 2.0 password files: hashing and atomic, concurrent-safe edits.

A line is ``username:$7$101$<b64 salt>$<b64 hash>``, the format
``mosquitto_passwd`` writes: PBKDF2-HMAC-SHA512 with 101 iterations over a
12-byte random salt, both base64 with padding. Mosquitto re-reads the file on
SIGHUP, so credentials change without a restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ota.errors import InvalidArgument

# Mosquitto 2.0.x's own parameters (mosquitto_passwd, PW_DEFAULT_ITERATIONS).
# Few iterations keep 10 000 device logins and rewrites cheap; the secrets are
# random (generate_secret), so hash stretching adds little here.
_ITERATIONS = 101
_SALT_LEN = 12
_PREFIX = "$7$"

# A username becomes one topic level through the ACL's %u and one line of the
# password file, so it must hold none of "/ + # :", whitespace or control bytes.
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_username(username: str, *, field: str = "username") -> str:
    """Return `username` if it is safe as a broker username and topic level."""
    if not _USERNAME.match(username):
        raise InvalidArgument(
            f"{username!r} is not a valid broker username: use 1-128 characters of "
            "letters, digits, '.', '_' or '-', starting with a letter or digit",
            field=field,
        )
    return username


def generate_secret() -> str:
    """A fresh random secret for one broker user (192 bits, URL-safe text)."""
    return secrets.token_urlsafe(24)


def mosquitto_hash(password: str, *, salt: bytes | None = None) -> str:
    """Hash `password` the way Mosquitto 2.0's ``mosquitto_passwd`` does."""
    if salt is None:
        salt = os.urandom(_SALT_LEN)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, _ITERATIONS)
    return (
        f"{_PREFIX}{_ITERATIONS}$"
        f"{base64.b64encode(salt).decode('ascii')}${base64.b64encode(digest).decode('ascii')}"
    )


def verify_mosquitto_hash(password: str, encoded: str) -> bool:
    """True if `password` matches a ``$7$`` (PBKDF2-SHA512) password-file hash."""
    parts = encoded.split("$")
    # "$7$101$salt$hash".split("$") == ["", "7", "101", "salt", "hash"]
    if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
        raise InvalidArgument(
            "not a Mosquitto $7$ (PBKDF2-SHA512) password hash", field="password_hash"
        )
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except binascii.Error as exc:
        raise InvalidArgument(
            f"password hash has invalid base64: {exc}", field="password_hash"
        ) from exc
    actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return hmac.compare_digest(actual, expected)


class PasswordFile:
    """A Mosquitto password file, edited in place.

    Every edit reads the current file, changes only the named users and
    replaces the file atomically (temp file, fsync, ``os.replace``) with mode
    0600, under an advisory lock on ``<path>.lock`` so concurrent writers,
    in this process or another, never lose each other's users. Comment and
    blank lines are kept. The broker sees the change after a reload (SIGHUP).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def usernames(self) -> list[str]:
        """The users in the file, in file order."""
        return [name for name, _ in self._read() if name is not None]

    def __contains__(self, username: object) -> bool:
        return isinstance(username, str) and username in self.usernames()

    def set(self, username: str, secret: str) -> None:
        """Add `username` or replace its secret."""
        self.set_many({username: secret})

    def set_many(self, secrets_by_username: Mapping[str, str]) -> None:
        """Add or replace several users at once (hashes each secret)."""
        hashed = {
            check_username(name): mosquitto_hash(secret)
            for name, secret in secrets_by_username.items()
        }
        with self._locked():
            lines = self._read()
            seen: set[str] = set()
            out: list[tuple[str | None, str]] = []
            for name, line in lines:
                if name is not None and name in hashed:
                    if name not in seen:  # a duplicate line would shadow the new secret
                        out.append((name, f"{name}:{hashed[name]}"))
                        seen.add(name)
                else:
                    out.append((name, line))
            out.extend((name, f"{name}:{h}") for name, h in hashed.items() if name not in seen)
            self._write(line for _, line in out)

    def remove(self, username: str) -> bool:
        """Remove `username`; False if it was not there."""
        return bool(self.remove_many([username]))

    def remove_many(self, usernames: Iterable[str]) -> frozenset[str]:
        """Remove several users at once; returns those that were present."""
        doomed = set(usernames)
        with self._locked():
            lines = self._read()
            removed = frozenset(name for name, _ in lines if name in doomed)
            if removed:
                self._write(line for name, line in lines if name not in removed)
        return removed

    def verify(self, username: str, secret: str) -> bool:
        """True if `username` is in the file with `secret`."""
        for name, line in self._read():
            if name == username:
                return verify_mosquitto_hash(secret, line.split(":", 1)[1])
        return False

    def _read(self) -> list[tuple[str | None, str]]:
        """(username or None for comments/blank lines, raw line) in file order."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        rows: list[tuple[str | None, str]] = []
        for line in text.splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith("#") or ":" not in stripped:
                rows.append((None, line))
            else:
                rows.append((stripped.split(":", 1)[0], stripped))
        return rows

    def _write(self, lines: Iterable[str]) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600, so no secret hash is ever world-readable.
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(line)
                    f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(directory)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable, so a crash cannot bring back the old file.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
