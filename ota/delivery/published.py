"""Published bundles by target path, read from the store and remembered.

A published bundle never changes (the repository refuses targets that change or
drop one), so a path once found is kept; a miss is asked again next time, since
the bundle may be published meanwhile.
"""

from __future__ import annotations

import threading

from ota.store import bundles
from ota.store.session import Store

MAX_ENTRIES = 4096


class StoredBundles:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._known: dict[str, tuple[str, int]] = {}

    def published(self, target_path: str) -> tuple[str, int] | None:
        with self._lock:
            known = self._known.get(target_path)
        if known is not None:
            return known
        with self._store.transaction() as session:
            row = bundles.bundle_by_target(session, target_path)
            found = (row.sha256, row.length) if row is not None else None
        if found is not None:
            with self._lock:
                if len(self._known) >= MAX_ENTRIES:
                    self._known.clear()
                self._known[target_path] = found
        return found
