"""The topic layout of PROTOCOL §4, as a validated value."""

from __future__ import annotations

from dataclasses import dataclass

from ota.errors import InvalidArgument

INGEST_GROUP = "ota-ingest"


@dataclass(frozen=True)
class Topics:
    root: str = "ota/v1"

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#\x00") or self.root.endswith("/"):
            raise InvalidArgument(f"{self.root!r} is not a valid topic root", field="topic_root")

    def desired(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/desired"

    def events(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/events"

    def state(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/state"

    def revoked(self) -> str:
        """Where the control plane names revoked devices (newline-separated) for the broker."""
        return f"{self.root}/control/revoked"

    def restored(self) -> str:
        """Where it names devices provisioned again after a revocation."""
        return f"{self.root}/control/restored"

    def shared_events(self) -> str:
        return f"$share/{INGEST_GROUP}/{self.root}/devices/+/events"

    def shared_state(self) -> str:
        return f"$share/{INGEST_GROUP}/{self.root}/devices/+/state"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device_id, kind) of a device topic, or None if it is not one."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2 or not parts[0] or parts[1] not in ("desired", "events", "state"):
            return None
        return parts[0], parts[1]
