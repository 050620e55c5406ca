"""The device side of trust, written as firmware would do it.

A device accepts a desired state only when the director keys named by its
trusted TUF root signed it, it is addressed to this device, newer than the last
one accepted and not expired; and it installs a bundle only when the TUF image
repository (python-tuf's ``Updater`` over a `MetadataSource`) vouches for
exactly the digest and length the director named.

Time: ngclient checks expiry against a reference time taken from the system
clock when an ``Updater`` is built; we overwrite it with the device clock,
raised to the time floor (the newest signed time seen) so a clock reset to 1970
cannot make expired metadata look fresh.

Delivery: bundle bytes stream through `MetadataSource.fetch_target` from a byte
offset. A stream that breaks (cut, reset, deadline) is resumed from the last
byte received after a jittered, exponentially growing pause (`RetryPolicy`):
while the control plane cannot be reached (a restart, an outage) for minutes,
otherwise for a bounded number of attempts; more bytes than the signed length
end the download at once. What is received is only ever kept once python-tuf checked its
length and hashes against the release-signed target.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from google.protobuf.message import DecodeError
from securesystemslib.exceptions import UnverifiedSignatureError
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile  # type: ignore[attr-defined, unused-ignore]
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from ota.clock import Clock
from ota.device.envelope import director_keys, open_envelope
from ota.device.retry import ControlPlaneUnreachable, RetryPolicy, Unreachable
from ota.domain.version import Version
from ota.errors import FailedPrecondition, InvalidArgument, OtaError, VerificationError
from ota.v1 import common_pb2

logger = logging.getLogger(__name__)

__all__ = [
    "ControlPlaneUnreachable",
    "DeviceTrust",
    "MetadataSource",
    "RetryPolicy",
    "StaleDesiredState",
    "Unreachable",
]

METADATA_BASE = "ota://metadata/"
TARGETS_BASE = "ota://targets/"
STATE_FILE = "trust-state.json"

_METADATA_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,18})\.)?(?P<role>[a-z]+)\.json$")
_HASHED_NAME = re.compile(r"^[0-9a-f]{64}\.(?P<name>.+)$")


class MetadataSource(Protocol):
    """Where a device gets TUF metadata and bundle bytes (gRPC on real devices).

    Errors a retry cannot fix (no such file, not allowed) are raised as
    ``tuf.api.exceptions.DownloadHTTPError``; a control plane that cannot be
    reached (refused, reset, unavailable, no answer) as `Unreachable` (or any
    ``ConnectionError``/``TimeoutError``), which the device waits out; anything
    else is taken as a broken transfer. Both are retried under the device's
    `RetryPolicy` (`ota.device.retry`). A source with a true
    ``content_addressed`` attribute gets bundle paths as ``<dir>/<sha256>.<name>``.
    """

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        """Metadata of `role` at `version` (None: the current one), or None if there is none."""
        ...

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        """Bundle bytes from `offset`, at most `max_length` of them."""
        ...


class StaleDesiredState(VerificationError):
    """A desired state not newer than the one already accepted: ignore it."""

    def __init__(self, generation: int, accepted: int) -> None:
        super().__init__(
            "ROLLBACK_REFUSED",
            f"desired state generation {generation} is not newer than {accepted}, "
            "the one already accepted",
        )
        self.generation = generation
        self.accepted = accepted


class DeviceTrust:
    """Verifies desired states and bundles for one device; keeps its trust state on disk.

    One caller at a time (a device is single-threaded). `max_clock_skew` is how far
    a desired state's ``issued_at`` may lie ahead of the device clock, and how far
    the clock may fall behind the time floor, before CLOCK_INVALID. `retry` governs
    broken metadata and bundle transfers. `durable=False` skips fsync, for
    simulating many devices on one disk (a killed process loses nothing either
    way: every write is a rename).
    """

    def __init__(
        self,
        *,
        device_id: str,
        model: str,
        firmware: str,
        state_dir: Path,
        trusted_root: bytes,
        source: MetadataSource,
        clock: Clock,
        max_clock_skew: timedelta = timedelta(hours=3),
        retry: RetryPolicy | None = None,
        durable: bool = True,
    ) -> None:
        self._device_id = device_id
        self._model = model
        self._firmware = Version.parse(firmware, field="firmware")
        self._trusted_root = trusted_root
        self._clock = clock
        self._max_skew = max_clock_skew
        self._metadata_dir = state_dir / "tuf"
        self._downloads = state_dir / "downloads"
        self._state_file = _StateFile(state_dir / STATE_FILE, durable=durable)
        self._fetcher = _SourceFetcher(source, retry=retry or RetryPolicy())
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        self._downloads.mkdir(parents=True, exist_ok=True)
        self._state = self._state_file.load()
        self._root: Root | None = None
        try:
            self._new_updater()  # fails early on a bad embedded root
        except tuf_errors.RepositoryError as exc:
            raise InvalidArgument(
                f"the embedded root is invalid: {exc}", field="trusted_root"
            ) from exc
        # Read the root chain on disk at boot, as firmware does, not when the first
        # desired state arrives: a fleet notified at once would all read it then.
        self._current_root()

    @property
    def accepted_generation(self) -> int:
        """Generation of the newest desired state accepted (0: none yet)."""
        return self._state.generation

    @property
    def time_floor(self) -> datetime | None:
        """The newest signed time seen; the device never believes it is earlier."""
        return self._state.time_floor

    @property
    def downloads(self) -> Path:
        """Where verified bundles are kept (named by their quoted target path)."""
        return self._downloads

    def accepted_state(self) -> common_pb2.DesiredState | None:
        """The desired state accepted last, while it has not expired (None otherwise).

        It was verified when accepted and is read back from the device's own disk:
        after a restart the device finishes what it was told before, without
        waiting for a newer desired state (the retained one is not newer).
        """
        if not self._state.desired:
            return None
        state = _parse_state(self._state.desired)
        _, expires = _times(state)
        if expires <= self._effective_now():
            logger.info(
                "device %s: accepted desired state %d has expired; waiting for a new one",
                self._device_id,
                state.generation,
            )
            return None
        return state

    # -- desired state ----------------------------------------------------------------

    def verify_desired_state(self, envelope_bytes: bytes) -> common_pb2.DesiredState:
        """Open a director envelope and return the desired state if this device may act on it."""
        try:
            envelope = common_pb2.Envelope.FromString(envelope_bytes)
        except DecodeError as exc:
            raise VerificationError("METADATA_INVALID", f"not a DSSE envelope: {exc}") from exc
        payload = self._open(envelope)
        state = _parse_state(payload)
        if state.device_id != self._device_id:
            raise VerificationError(
                "WRONG_DEVICE", f"desired state is for {state.device_id!r}, not {self._device_id!r}"
            )
        if state.generation <= self._state.generation:
            raise StaleDesiredState(state.generation, self._state.generation)
        issued, expires = _times(state)
        now = self._clock.now()
        floor = self._state.time_floor
        if expires <= max(now, floor or now):
            raise VerificationError(
                "METADATA_EXPIRED",
                f"desired state generation {state.generation} expired at {expires}",
            )
        if issued > now + self._max_skew:
            raise VerificationError(
                "CLOCK_INVALID", f"desired state issued at {issued} but the device clock says {now}"
            )
        if floor is not None and now < floor - self._max_skew:
            raise VerificationError(
                "CLOCK_INVALID", f"device clock {now} is before {floor}, a time already signed"
            )
        self._state = _State(state.generation, max(issued, floor or issued), payload)
        self._state_file.save(self._state)
        return state

    def _open(self, envelope: common_pb2.Envelope) -> bytes:
        # The root chain the device already trusts is on its own disk: a whole fleet
        # notified at once must not first refresh its TUF metadata over the network.
        # A newer root reaches the device with every bundle download's refresh, and
        # here when the envelope names a keyid this root does not know (a rotated
        # director key). Known keyids with bad signatures cost no network.
        keys, threshold = director_keys(self._current_root())
        try:
            return open_envelope(envelope, keys, threshold)
        except VerificationError:
            if not {s.keyid for s in envelope.signatures} - set(keys):
                raise
        self._refresh_quietly()
        keys, threshold = director_keys(self._current_root())
        return open_envelope(envelope, keys, threshold)

    # -- TUF --------------------------------------------------------------------------

    def refresh_metadata(self) -> None:
        """Fetch and verify the newest root, timestamp, snapshot and targets."""
        updater = self._new_updater()
        try:
            with as_verification_error("metadata"):
                updater.refresh()
        finally:
            self._root = None  # a newer root may have been trusted even if a later step failed

    def fetch_bundle(self, assignment: common_pb2.FeatureAssignment) -> Path:
        """Download the assigned bundle, verified against TUF and the director; return its path."""
        if len(assignment.sha256) != 32 or not assignment.target_path:
            raise VerificationError(
                "METADATA_INVALID", "assignment needs a target path and a 32-byte sha256"
            )
        updater, info = self._target_info(assignment.target_path)
        if info is None:
            raise VerificationError(
                "SIGNATURE_INVALID", f"{assignment.target_path} is not signed by a release key"
            )
        self._check_assignment(assignment, info)
        final = self._downloads / quote(info.path, safe="")
        if updater.find_cached_target(info, str(final)) is not None:
            return final
        return self._download(updater, info, final)

    def _target_info(self, target_path: str) -> tuple[Updater, TargetFile | None]:
        # A cache in front of the repository may serve a timestamp a few seconds older
        # than the publication the director names: look again, under the retry policy.
        retry = self._fetcher.retry
        failures = 0
        while True:
            updater = self._new_updater()
            try:
                with as_verification_error(target_path):
                    updater.refresh()
                    info = updater.get_targetinfo(target_path)
            finally:
                self._root = None
            failures += 1
            if info is not None or failures >= retry.attempts:
                return updater, info
            pause = retry.delay(failures, self._fetcher.rng)
            logger.info("%s is not in the targets yet; refreshing in %.2fs", target_path, pause)
            retry.sleep(pause)

    def _check_assignment(self, assignment: common_pb2.FeatureAssignment, info: TargetFile) -> None:
        # The director picks among signed bundles; it must name one exactly as signed.
        if info.hashes.get("sha256") != assignment.sha256.hex():
            raise VerificationError(
                "HASH_MISMATCH",
                f"director's sha256 for {info.path} differs from the release-signed one",
            )
        if info.length != assignment.length:
            raise VerificationError(
                "LENGTH_MISMATCH",
                f"director's length {assignment.length} for {info.path} differs from the "
                f"release-signed {info.length}",
            )
        custom = info.custom
        if not isinstance(custom, dict) or not isinstance(custom.get("models"), list):
            raise VerificationError("METADATA_INVALID", f"{info.path} has no compatible models")
        if (custom.get("feature"), custom.get("version")) != (
            assignment.feature,
            assignment.version,
        ):
            raise VerificationError(
                "INCOMPATIBLE",
                f"{info.path} is {custom.get('feature')} {custom.get('version')}, "
                f"not {assignment.feature} {assignment.version}",
            )
        if self._model not in custom["models"]:
            raise VerificationError(
                "INCOMPATIBLE", f"{info.path} is not built for model {self._model!r}"
            )
        min_firmware = custom.get("min_firmware")
        if min_firmware is not None:
            try:
                required = Version.parse(str(min_firmware))
            except OtaError as exc:
                raise VerificationError("METADATA_INVALID", exc.message) from exc
            if self._firmware < required:
                raise VerificationError(
                    "INCOMPATIBLE",
                    f"{info.path} needs firmware {required} or later; this device runs "
                    f"{self._firmware}",
                )

    def _download(self, updater: Updater, info: TargetFile, final: Path) -> Path:
        partial = final.with_name(final.name + ".part")
        self._fetcher.expect(info.length)
        try:
            with as_verification_error(info.path):
                try:
                    updater.download_target(info, str(partial))
                except tuf_errors.LengthOrHashMismatchError as exc:
                    raise self._mismatch(info, exc) from exc
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
        return final

    def _mismatch(self, info: TargetFile, exc: Exception) -> VerificationError:
        received = self._fetcher.received
        if received == 0:
            return VerificationError("DOWNLOAD_FAILED", f"{info.path}: no bytes received")
        if received != info.length:
            return VerificationError(
                "LENGTH_MISMATCH", f"{info.path}: received {received} of {info.length} bytes"
            )
        return VerificationError("HASH_MISMATCH", f"{info.path}: {exc}")

    def _new_updater(self) -> Updater:
        return build_updater(
            self._metadata_dir,
            METADATA_BASE,
            bootstrap=self._trusted_root,
            reference_time=self._effective_now(),
            fetcher=self._fetcher,
            target_dir=self._downloads,
            target_base_url=TARGETS_BASE,
        )

    def _effective_now(self) -> datetime:
        now = self._clock.now()
        floor = self._state.time_floor
        return max(now, floor) if floor is not None else now

    def _refresh_quietly(self) -> None:
        try:
            self.refresh_metadata()
        except VerificationError as exc:
            # Keep using the roots already trusted; the caller's check decides.
            logger.info("device %s: TUF refresh failed: %s", self._device_id, exc)

    def _current_root(self) -> Root:
        if self._root is None:
            self._root = _trusted_root_chain(self._trusted_root, self._metadata_dir)
        return self._root


def build_updater(
    metadata_dir: Path,
    metadata_base_url: str,
    *,
    bootstrap: bytes | None,
    reference_time: datetime,
    fetcher: FetcherInterface | None = None,
    target_dir: Path | None = None,
    target_base_url: str | None = None,
) -> Updater:
    """A python-tuf ``Updater`` judging expiry at `reference_time` rather than the system clock.

    `bootstrap` None trusts the root already stored in `metadata_dir`. Without a
    `fetcher` the updater uses python-tuf's own HTTP fetcher (urllib3).
    """
    updater = Updater(
        str(metadata_dir),
        metadata_base_url,
        str(target_dir) if target_dir is not None else None,
        target_base_url,
        fetcher,
        bootstrap=bootstrap,
    )
    # ngclient took the system time in its constructor; use the caller's instead.
    updater._trusted_set.reference_time = reference_time
    return updater


def check_not_downgrade(assignment: common_pb2.FeatureAssignment, installed_version: str) -> None:
    """Refuse an assignment that would replace `installed_version` with one not newer.

    The same version with other bytes is refused too: a version names one bundle.
    Going back is only ever a signed revert to the device's own last-known-good
    bundle, which does not come through here.
    """
    try:
        assigned = Version.parse(assignment.version)
        running = Version.parse(installed_version)
    except OtaError as exc:
        raise VerificationError("METADATA_INVALID", exc.message) from exc
    if assigned <= running:
        raise VerificationError(
            "ROLLBACK_REFUSED",
            f"{assignment.feature} {assigned} is not newer than {running}, which this device "
            "runs; only a signed revert to its last-known-good bundle may go back",
        )


def _trusted_root_chain(bootstrap: bytes, metadata_dir: Path) -> Root:
    """The newest root reachable from `bootstrap` through roots ngclient already stored.

    Each link is re-verified (signed by the previous root's and its own threshold),
    so only the file layout of ngclient (``root_history/N.root.json``) is assumed.
    """
    root = _embedded_root(bootstrap)
    while True:
        path = metadata_dir / "root_history" / f"{root.version + 1}.root.json"
        try:
            new: Metadata[Root] = Metadata.from_bytes(path.read_bytes())
            if not isinstance(new.signed, Root) or new.signed.version != root.version + 1:
                raise tuf_errors.RepositoryError(f"{path} is not root v{root.version + 1}")
            root.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            new.signed.verify_delegate(Root.type, new.signed_bytes, new.signatures)
        except FileNotFoundError:
            return root
        except (OSError, tuf_errors.RepositoryError) as exc:
            logger.warning("ignoring stored root %s: %s", path, exc)
            return root
        root = new.signed


@functools.lru_cache(maxsize=4)
def _embedded_root(bootstrap: bytes) -> Root:
    """The embedded root, parsed once per process: every device of a simulated fleet
    embeds the same bytes. Only read, never changed; each stored root that follows it
    is still verified per device."""
    md: Metadata[Root] = Metadata.from_bytes(bootstrap)
    return md.signed


def _parse_state(payload: bytes) -> common_pb2.DesiredState:
    try:
        return common_pb2.DesiredState.FromString(payload)
    except DecodeError as exc:
        raise VerificationError("METADATA_INVALID", f"not a DesiredState: {exc}") from exc


def _times(state: common_pb2.DesiredState) -> tuple[datetime, datetime]:
    if not state.HasField("issued_at") or not state.HasField("expires_at"):
        raise VerificationError("METADATA_INVALID", "desired state lacks issued_at or expires_at")
    try:
        return state.issued_at.ToDatetime(tzinfo=UTC), state.expires_at.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise VerificationError(
            "METADATA_INVALID", f"desired state time out of range: {exc}"
        ) from exc


@contextmanager
def as_verification_error(subject: str) -> Iterator[None]:
    """Translate python-tuf's exceptions into a VerificationError naming the FailureReason."""
    try:
        yield
    except VerificationError:
        raise
    except (tuf_errors.UnsignedMetadataError, UnverifiedSignatureError) as exc:
        raise VerificationError("SIGNATURE_INVALID", f"{subject}: {exc}") from exc
    except tuf_errors.ExpiredMetadataError as exc:
        raise VerificationError("METADATA_EXPIRED", f"{subject}: {exc}") from exc
    except tuf_errors.BadVersionNumberError as exc:
        raise VerificationError("ROLLBACK_REFUSED", f"{subject}: {exc}") from exc
    except tuf_errors.LengthOrHashMismatchError as exc:
        # Metadata that does not match what snapshot/timestamp pinned: mix-and-match.
        raise VerificationError("HASH_MISMATCH", f"{subject}: {exc}") from exc
    except tuf_errors.DownloadLengthMismatchError as exc:
        # More bytes than the signed length (endless data), cut off at the cap.
        raise VerificationError("LENGTH_MISMATCH", f"{subject}: {exc}") from exc
    except ControlPlaneUnreachable as exc:
        # Waited the retry window out: the device will try again, nothing failed.
        raise VerificationError("CONTROL_PLANE_UNREACHABLE", f"{subject}: {exc}") from exc
    except tuf_errors.DownloadError as exc:
        raise VerificationError("DOWNLOAD_FAILED", f"{subject}: {exc}") from exc
    except tuf_errors.RepositoryError as exc:
        raise VerificationError("METADATA_INVALID", f"{subject}: {exc}") from exc
    except OSError as exc:
        raise VerificationError("DOWNLOAD_FAILED", f"{subject}: cannot store: {exc}") from exc


class _SourceFetcher(FetcherInterface):
    """Maps ngclient's URLs onto a `MetadataSource`; retries and resumes broken transfers."""

    def __init__(self, source: MetadataSource, *, retry: RetryPolicy) -> None:
        self._source = source
        self.retry = self._retry = retry
        self.rng = self._rng = random.Random()
        self._expected = 0
        self.received = 0

    def expect(self, length: int) -> None:
        """Signed length of the next bundle: a resumed stream asks for the rest only."""
        self._expected = length

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_BASE):
            return self._metadata(url.removeprefix(METADATA_BASE))
        if url.startswith(TARGETS_BASE):
            name = url.removeprefix(TARGETS_BASE)
            parent, sep, base = name.rpartition("/")
            hashed = _HASHED_NAME.match(base)
            if hashed is not None:
                # An HTTP source asks by content address (cacheable); gRPC by target path.
                content_addressed = getattr(self._source, "content_addressed", False)
                return self._target(name if content_addressed else f"{parent}{sep}{hashed['name']}")
        # ngclient treats 404 as "no such file" (e.g. no newer root): anything else breaks it.
        raise tuf_errors.DownloadHTTPError(f"{url} not found", 404)

    def _metadata(self, name: str) -> Iterator[bytes]:
        match = _METADATA_NAME.match(name)
        if match is None:
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        role = match["role"]
        version = int(match["version"]) if match["version"] else None
        # Called eagerly: fetch() wraps errors raised here, not those raised while iterating.
        data = self._retry.call(
            f"metadata {name}",
            lambda: self._source.fetch_metadata(role, version),
            self._rng,
            permanent=tuf_errors.DownloadError,
        )
        if data is None:
            raise tuf_errors.DownloadHTTPError(f"{name} not found", 404)
        return iter((data,))

    def _target(self, target_path: str) -> Iterator[bytes]:
        self.received = 0
        retries = self._retry.tracker(f"download of {target_path}", self._rng)
        while True:
            chunks: Iterator[bytes] | None = None
            try:
                chunks = self._source.fetch_target(
                    target_path, self.received, max(self._expected - self.received, 0)
                )
                for chunk in chunks:
                    self.received += len(chunk)
                    retries.progressed()
                    if self.received > self._expected:
                        # Endless data: stop now, not when memory or disk runs out.
                        raise tuf_errors.DownloadLengthMismatchError(
                            f"{target_path}: the server sent more than the "
                            f"{self._expected} bytes signed"
                        )
                    yield chunk
                return
            except tuf_errors.DownloadError:
                raise
            except Exception as exc:
                if self.received == self._expected:
                    return  # broke after the last byte: the hash check decides
                try:
                    # Pauses (the place is kept: the next call resumes at self.received),
                    # or gives up.
                    retries.failed(exc)
                except ControlPlaneUnreachable:
                    raise
                except Exception as last:
                    raise tuf_errors.DownloadError(
                        f"{target_path}: gave up after {self._retry.attempts} attempts at "
                        f"byte {self.received} of {self._expected}: {last}"
                    ) from last
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()  # ends the call on the wire, not only here


@dataclass(frozen=True)
class _State:
    generation: int = 0
    time_floor: datetime | None = None
    desired: bytes = b""  # the accepted desired state's payload, as verified


class _StateFile:
    """The device's small trust state, written atomically (write, fsync, rename)."""

    def __init__(self, path: Path, *, durable: bool) -> None:
        self._path = path
        self._durable = durable

    def load(self) -> _State:
        try:
            doc = json.loads(self._path.read_text())
            floor = doc.get("time_floor")
            return _State(
                generation=int(doc["generation"]),
                time_floor=datetime.fromisoformat(floor) if floor else None,
                desired=base64.b64decode(doc.get("desired") or "", validate=True),
            )
        except FileNotFoundError:
            return _State()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Starting from zero would accept replayed desired states: refuse instead.
            raise FailedPrecondition(
                f"device trust state {self._path} is unreadable: {exc}"
            ) from exc

    def save(self, state: _State) -> None:
        doc = {
            "generation": state.generation,
            "time_floor": state.time_floor.isoformat() if state.time_floor else None,
            "desired": base64.b64encode(state.desired).decode(),
        }
        write_atomically(self._path, json.dumps(doc).encode(), durable=self._durable)


def write_atomically(path: Path, data: bytes, *, durable: bool) -> None:
    """Replace `path` with `data` so a reader (or a reboot) sees the old or the new file, whole.

    `durable` also survives power loss (fsync of the file and of the directory);
    without it a killed process still never leaves a torn file.
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
