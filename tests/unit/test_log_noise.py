"""python-tuf's per-missing-signature lines are dropped; its other lines are kept."""

from __future__ import annotations

import logging

from ota.logs import configure_logging


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("tuf.api._payload", level, __file__, 1, msg, args, None)


def test_pending_signature_noise_is_filtered_and_the_rest_kept() -> None:
    configure_logging("text")
    tuf = logging.getLogger("tuf.api._payload")
    assert not tuf.filter(_record("No signature for keyid %s", "ab12"))
    assert tuf.filter(_record("Key %s failed to verify sig with scheme %s", "ab12", "ed25519"))
    assert tuf.filter(_record("No signature for keyid %s", "ab12", level=logging.WARNING))
