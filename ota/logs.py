"""Log output: text for people, or one JSON object a line for log collectors.

Code logs with stdlib `logging` and passes what identifies the subject as
`extra={"rollout_id": ..., "device_id": ...}`; the JSON format turns those
into fields, so a collector can filter one rollout's or one device's lines.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes a LogRecord may carry through `extra=` that become JSON fields.
_MARK = "_ota_handler"
CONTEXT_FIELDS = ("rollout_id", "device_id", "stage", "reason", "method", "code", "token_id")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(
    log_format: str = "text", *, verbose: bool = False, force: bool = False
) -> None:
    """Log to stderr in `log_format`. Like `logging.basicConfig`, leaves a root logger
    that someone else has set up (a test runner, an embedding program) alone unless `force`."""
    tuf = logging.getLogger("tuf.api._payload")
    if _quiet_pending_signatures not in tuf.filters:
        tuf.addFilter(_quiet_pending_signatures)
    root = logging.getLogger()
    foreign = [h for h in root.handlers if not getattr(h, _MARK, False)]
    if foreign and not force:
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler()
    setattr(handler, _MARK, True)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


def _quiet_pending_signatures(record: logging.LogRecord) -> bool:
    """Drop python-tuf's "No signature for keyid" lines.

    While a publication waits for more release signatures, every verification of
    its targets logs one per missing key (a third of a server's lines); the
    pending state is reported by `ota bundle list` and the bundle log lines instead.
    """
    return not (record.levelno <= logging.INFO and record.msg == "No signature for keyid %s")
