"""Reading a rollout's progress: what the gate and the engine decide on."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlmodel import Session

from ota.domain import progress as rules
from ota.store import rollouts


@dataclass(frozen=True)
class Progress:
    """Devices by state, and what the rules of `ota.domain.progress` count in them."""

    states: dict[str, int]

    @property
    def exposed(self) -> int:
        return sum(self.states.values())

    @property
    def failed(self) -> int:
        return rules.failed(self.states)

    @property
    def finished(self) -> int:
        return rules.finished(self.states)


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
