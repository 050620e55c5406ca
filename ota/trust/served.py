"""TUF metadata as devices fetch it, served from memory.

A versioned file (``N.root.json``, ``N.snapshot.json``, ``N.targets.json`` ...) never
changes once stored: the store refuses a second ``(role, version)``. Its bytes are kept
in a bounded LRU and served without the database.

What "latest" means changes when any replica publishes or re-signs, so it is never
taken from memory: a request for the latest (or for a root above the newest known)
waits for a read of every role's newest version number that started after the request
arrived, one small query that concurrent requests share. A device therefore sees every
version committed before it asked, as when each request read the database itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Protocol

from tuf.api.metadata import Root  # type: ignore[attr-defined, unused-ignore]

# Each entry is one signed file (a few KiB; targets grows with the bundles it lists).
MAX_VERSIONED_ENTRIES = 256


class MetadataReader(Protocol):
    def get_metadata(self, role: str, version: int | None) -> bytes | None: ...

    def latest_versions(self) -> dict[str, int]: ...


class ServedMetadata:
    """A read-through cache over a `MetadataReader`, for the device-facing reads only."""

    def __init__(self, source: MetadataReader, *, max_versioned: int = MAX_VERSIONED_ENTRIES):
        self._source = source
        self._max_versioned = max_versioned
        self._lock = threading.Lock()
        self._versioned: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        # Shared reads of the newest versions: how many started, whether one is running,
        # and the last one's result with its number.
        self._read_done = threading.Condition()
        self._reads_started = 0
        self._reading = False
        self._latest_seq = 0
        self._latest: dict[str, int] = {}

    def get(self, role: str, version: int | None) -> bytes | None:
        """Bytes of `role` at `version` (None: the latest), or None if there is none."""
        if version is not None:
            cached = self._cached(role, version)
            if cached is not None:
                return cached
            # Root N+1 is how a device learns of a rotation: mostly it does not exist yet.
            if role == Root.type and version > self._latest_versions().get(role, 0):
                return None
        else:
            version = self._latest_versions().get(role)
            if version is None:
                return None
            cached = self._cached(role, version)
            if cached is not None:
                return cached
        content = self._source.get_metadata(role, version)
        if content is not None:
            self._remember(role, version, content)
        return content

    def _latest_versions(self) -> dict[str, int]:
        """Newest version of each role, read after this call began (shared with others)."""
        with self._read_done:
            needed = self._reads_started + 1
            while True:
                if self._latest_seq >= needed:
                    return self._latest
                if not self._reading:
                    self._reading = True
                    self._reads_started += 1
                    seq = self._reads_started
                    break
                self._read_done.wait()
        versions: dict[str, int] | None = None
        try:
            versions = self._source.latest_versions()
            return versions
        finally:
            with self._read_done:
                self._reading = False
                if versions is not None:
                    self._latest_seq, self._latest = seq, versions
                # On a failure a waiter starts the next read and gets its own error.
                self._read_done.notify_all()

    def _cached(self, role: str, version: int) -> bytes | None:
        with self._lock:
            cached = self._versioned.get((role, version))
            if cached is not None:
                self._versioned.move_to_end((role, version))
            return cached

    def _remember(self, role: str, version: int, content: bytes) -> None:
        with self._lock:
            self._versioned[(role, version)] = content
            self._versioned.move_to_end((role, version))
            while len(self._versioned) > self._max_versioned:
                self._versioned.popitem(last=False)
