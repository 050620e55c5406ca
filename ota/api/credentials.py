"""Device credential checks that arrive together share one database read.

When a stage starts, thousands of devices make their first call within seconds,
each needing its secret checked against the database. A check waits for a read
that includes its device and that started after the check arrived, so a device
revoked before the call is refused exactly as with a read of its own; the calls
waiting meanwhile are read together in the next query.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from ota.store.fleet import hash_secret

ReadDigests = Callable[[Collection[str]], dict[str, str]]


@dataclass
class _Batch:
    device_ids: set[str] = field(default_factory=set)
    done: bool = False
    digests: dict[str, str] = field(default_factory=dict)
    error: BaseException | None = None


class CredentialChecks:
    """`check(device_id, secret)`, reading the digests of concurrent checks at once."""

    def __init__(self, read_digests: ReadDigests) -> None:
        # A batch holds at most one check per server thread, so its IN list stays small.
        self._read = read_digests
        self._changed = threading.Condition()
        self._waiting: _Batch | None = None
        self._reading = False

    def check(self, device_id: str, secret: str) -> bool:
        digest = self.value(device_id)
        return digest is not None and secrets.compare_digest(digest, hash_secret(secret))

    def value(self, device_id: str) -> str | None:
        """What the read returned for `device_id` (None: not there), read with the others."""
        batch = self._join(device_id)
        if batch.error is not None:
            raise batch.error
        return batch.digests.get(device_id)

    def _join(self, device_id: str) -> _Batch:
        with self._changed:
            batch = self._waiting
            if batch is None:
                batch = self._waiting = _Batch()
            batch.device_ids.add(device_id)
            while not batch.done:
                if not self._reading and self._waiting is batch:
                    self._reading = True
                    self._waiting = None
                    break
                self._changed.wait()
            else:
                return batch
        try:
            batch.digests = self._read(batch.device_ids)
        except BaseException as exc:
            batch.error = exc
        finally:
            with self._changed:
                batch.done = True
                self._reading = False
                self._changed.notify_all()
        return batch
