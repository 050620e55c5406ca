"""Reading a rollout's progress: what the gate and the engine decide on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from ota.store import rollouts

FINISHED_OK = ("INSTALLED", "ACTIVE")


@dataclass(frozen=True)
class Progress:
    states: dict[str, int]

    @property
    def exposed(self) -> int:
        return sum(self.states.values())

    @property
    def failed(self) -> int:
        return self.states.get("FAILED", 0)

    @property
    def finished(self) -> int:
        return self.failed + sum(self.states.get(s, 0) for s in FINISHED_OK)


def read_progress(
    session: Session,
    rollout_id: str,
    *,
    stage: int | None = None,
    changed_since: datetime | None = None,
) -> Progress:
    """Progress of the whole rollout, of one stage's devices, or of a window of time."""
    return Progress(
        rollouts.state_counts(session, rollout_id, stage=stage, changed_since=changed_since)
    )
