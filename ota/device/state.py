"""What a device has installed, kept on disk so that a restart or a power cut changes nothing.

Per feature the device keeps:

- the installed bundle and the last-known-good one (the bundle it ran before,
  while that one was active): version, digest, length, TUF target path and the
  verified file kept on disk, so a signed revert reactivates it without a
  download;
- the assignment in flight and the last step reported for it, so a device that
  stopped between download and install re-verifies the file it kept, installs
  it and reports each remaining step once;
- the assignment last settled, so a renewed copy of a desired state (same
  rollout, same bundle) is not carried out, or refused, a second time.

The file lives in the device's state directory next to the trust state of
`ota.device.trust` (trusted metadata, highest generation, time floor) and the
event sequence, and is replaced atomically on every change.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ota.device.trust import write_atomically
from ota.domain.states import RANK
from ota.errors import FailedPrecondition
from ota.v1 import common_pb2

STATE_FILE = "features.json"
FORMAT = 1


@dataclass(frozen=True)
class InstalledBundle:
    """One feature's bundle as the device holds it; `file` is the verified copy on disk."""

    version: str
    sha256: bytes
    length: int
    target_path: str
    file: Path
    active: bool = True

    def intact(self) -> bool:
        """Whether the kept file still has the length and digest it was verified with."""
        digest = hashlib.sha256()
        size = 0
        try:
            with self.file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    size += len(chunk)
                    if size > self.length:
                        return False
                    digest.update(chunk)
        except OSError:
            return False
        return size == self.length and digest.digest() == self.sha256


@dataclass(frozen=True)
class InFlight:
    """An assignment being carried out, and the last step reported for it."""

    rollout_id: str
    sha256: bytes
    reached: str
    file: Path | None = None

    def is_for(self, a: common_pb2.FeatureAssignment) -> bool:
        return (self.rollout_id, self.sha256) == (a.rollout_id, a.sha256)


@dataclass
class _Feature:
    installed: InstalledBundle | None = None
    last_known_good: InstalledBundle | None = None
    in_flight: InFlight | None = None
    settled: str = ""


def settled_key(a: common_pb2.FeatureAssignment) -> str:
    """What makes two assignments the same order: rollout, bundle, active, revert."""
    return f"{a.rollout_id}/{a.sha256.hex()}/{int(a.active)}/{int(a.revert)}"


def reached_at_least(reached: str | None, step: str) -> bool:
    """Whether a step at least as far as `step` was already reported."""
    return reached is not None and RANK[reached] >= RANK[step]


@dataclass
class InstalledFeatures:
    """The device's installed and last-known-good bundles per feature, and work in flight.

    Changes are made in memory; `save` writes them all at once, then deletes the
    bundle files no longer needed (only then: until the new state is on disk, the
    old one may still name them). `path` None keeps nothing on disk (a device
    that forgets everything when it restarts).
    """

    path: Path | None = None
    durable: bool = True
    _features: dict[str, _Feature] = field(default_factory=dict)
    _released: set[Path] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path | None, *, durable: bool = True) -> InstalledFeatures:
        """Read the state kept at `path`; a device that never saved any starts empty.

        An unreadable file is refused rather than taken as empty: forgetting what
        runs would let an older bundle in as an "upgrade".
        """
        state = cls(path, durable)
        if path is None:
            return state
        try:
            doc = json.loads(path.read_bytes())
            if doc.get("format") != FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            base = path.parent
            for name, f in doc["features"].items():
                state._features[str(name)] = _Feature(
                    installed=_bundle_from(f.get("installed"), base),
                    last_known_good=_bundle_from(f.get("last_known_good"), base),
                    in_flight=_in_flight_from(f.get("in_flight"), base),
                    settled=str(f.get("settled", "")),
                )
        except FileNotFoundError:
            return state
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FailedPrecondition(f"device feature state {path} is unreadable: {exc}") from exc
        return state

    # -- reading ----------------------------------------------------------------------

    # Readers may be other threads (a test, a status line): they iterate over a copy,
    # taken at once, of what only the device's own thread changes.

    @property
    def installed(self) -> Mapping[str, InstalledBundle]:
        return {n: f.installed for n, f in list(self._features.items()) if f.installed}

    @property
    def last_known_good(self) -> Mapping[str, InstalledBundle]:
        return {n: f.last_known_good for n, f in list(self._features.items()) if f.last_known_good}

    def in_flight(self, feature: str) -> InFlight | None:
        f = self._features.get(feature)
        return f.in_flight if f is not None else None

    def reached(self, a: common_pb2.FeatureAssignment) -> str | None:
        """The last step reported for this very assignment, if it is the one in flight."""
        flight = self.in_flight(a.feature)
        return flight.reached if flight is not None and flight.is_for(a) else None

    def is_settled(self, a: common_pb2.FeatureAssignment) -> bool:
        f = self._features.get(a.feature)
        return f is not None and f.settled == settled_key(a)

    def kept_files(self) -> set[Path]:
        """Files the device still needs: installed, last-known-good and in-flight bundles."""
        kept: set[Path] = set()
        for f in list(self._features.values()):
            for b in (f.installed, f.last_known_good):
                if b is not None:
                    kept.add(b.file)
            if f.in_flight is not None and f.in_flight.file is not None:
                kept.add(f.in_flight.file)
        return kept

    # -- changing (in memory; `save` writes) -----------------------------------------

    def mark(self, a: common_pb2.FeatureAssignment, reached: str, *, file: Path | None) -> None:
        """Record that `reached` was reported for `a` (and where its verified file is)."""
        slot = self._slot(a.feature)
        self._release(slot.in_flight)
        slot.in_flight = InFlight(a.rollout_id, a.sha256, reached, file)
        slot.settled = ""  # new work: the order settled before is history

    def abandon(self, feature: str) -> bool:
        """Drop the work in flight for `feature`; whether there was any."""
        f = self._features.get(feature)
        if f is None or f.in_flight is None:
            return False
        self._release(f.in_flight)
        f.in_flight = None
        return True

    def settle(self, a: common_pb2.FeatureAssignment) -> None:
        """`a` is carried out (or refused for good): a renewed copy of it changes nothing."""
        slot = self._slot(a.feature)
        slot.settled = settled_key(a)
        if slot.in_flight is not None and slot.in_flight.is_for(a):
            self._release(slot.in_flight)
            slot.in_flight = None

    def install(self, a: common_pb2.FeatureAssignment, file: Path) -> InstalledBundle:
        """Make `a`'s verified bundle the installed one; the one it replaces, if active, is LKG."""
        slot = self._slot(a.feature)
        previous = slot.installed
        if previous is not None and previous.active and previous.sha256 != a.sha256:
            self._release(slot.last_known_good)
            slot.last_known_good = previous
        elif previous is not None and not previous.active:
            self._release(slot.last_known_good)
            self._release(previous)
            slot.last_known_good = None  # a deactivated bundle is nobody's fallback
        self._release(slot.in_flight)
        bundle = InstalledBundle(
            version=a.version,
            sha256=a.sha256,
            length=a.length,
            target_path=a.target_path,
            file=file,
        )
        slot.installed = bundle
        slot.in_flight = InFlight(a.rollout_id, a.sha256, "INSTALLING", file)
        slot.settled = ""
        return bundle

    def revert_to_last_known_good(self, feature: str) -> InstalledBundle:
        """Run the last-known-good bundle again; the one it replaces is dropped."""
        slot = self._slot(feature)
        good = slot.last_known_good
        if good is None:
            raise FailedPrecondition(f"{feature} has no last-known-good bundle", field="feature")
        self._release(slot.installed)
        self._release(slot.in_flight)
        slot.installed = replace(good, active=True)
        slot.last_known_good = None
        slot.in_flight = None
        return slot.installed

    def set_active(self, feature: str, active: bool) -> None:
        slot = self._slot(feature)
        if slot.installed is None:
            raise FailedPrecondition(f"{feature} is not installed", field="feature")
        slot.installed = replace(slot.installed, active=active)

    def _slot(self, feature: str) -> _Feature:
        return self._features.setdefault(feature, _Feature())

    def _release(self, held: InstalledBundle | InFlight | None) -> None:
        if held is not None and held.file is not None:
            self._released.add(held.file)

    # -- disk -------------------------------------------------------------------------

    def save(self) -> None:
        """Write the whole state atomically, then delete the bundle files it let go of."""
        if self.path is None:
            self._released.clear()
            return
        base = self.path.parent
        doc = {
            "format": FORMAT,
            "features": {
                name: {
                    "installed": _bundle_doc(f.installed, base),
                    "last_known_good": _bundle_doc(f.last_known_good, base),
                    "in_flight": _in_flight_doc(f.in_flight, base),
                    "settled": f.settled,
                }
                for name, f in sorted(self._features.items())
            },
        }
        write_atomically(self.path, json.dumps(doc).encode(), durable=self.durable)
        released, self._released = self._released - self.kept_files(), set()
        for file in released:
            file.unlink(missing_ok=True)

    def prune(self, directory: Path) -> list[Path]:
        """Delete every file in `directory` the device does not need (at boot: leftovers
        of work cut short, partial downloads); return them."""
        kept = {p.name for p in self.kept_files() if p.parent == directory}
        removed: list[Path] = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.is_file() and entry.name not in kept:
                path = directory / entry.name
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def _rel(path: Path, base: Path) -> str:
    # Relative to the state directory, so the directory can move as a whole.
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


def _bundle_doc(b: InstalledBundle | None, base: Path) -> dict[str, Any] | None:
    if b is None:
        return None
    return {
        "version": b.version,
        "sha256": b.sha256.hex(),
        "length": b.length,
        "target_path": b.target_path,
        "file": _rel(b.file, base),
        "active": b.active,
    }


def _bundle_from(doc: Any, base: Path) -> InstalledBundle | None:
    if doc is None:
        return None
    sha = bytes.fromhex(doc["sha256"])
    if len(sha) != 32:
        raise ValueError("a sha256 has 32 bytes")
    return InstalledBundle(
        version=str(doc["version"]),
        sha256=sha,
        length=int(doc["length"]),
        target_path=str(doc["target_path"]),
        file=base / doc["file"],
        active=bool(doc["active"]),
    )


def _in_flight_doc(f: InFlight | None, base: Path) -> dict[str, Any] | None:
    if f is None:
        return None
    return {
        "rollout_id": f.rollout_id,
        "sha256": f.sha256.hex(),
        "reached": f.reached,
        "file": _rel(f.file, base) if f.file is not None else None,
    }


def _in_flight_from(doc: Any, base: Path) -> InFlight | None:
    if doc is None:
        return None
    reached = str(doc["reached"])
    if reached not in RANK:
        raise ValueError(f"{reached!r} is not a step of an install")
    return InFlight(
        rollout_id=str(doc["rollout_id"]),
        sha256=bytes.fromhex(doc["sha256"]),
        reached=reached,
        file=base / doc["file"] if doc.get("file") else None,
    )
