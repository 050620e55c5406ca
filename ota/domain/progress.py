"""How a device's events move its standing in one rollout: the one place for the rule.

A device reports each step as an event (`ota.domain.states`). The control plane
(ingest) and the simulator (what it expects the control plane to show) both
apply events through `advance`, in the device's own sequence order:

- progress (NOTIFIED ... ACTIVE, ROLLED_BACK, DEACTIVATED) moves the state;
- FAILED with a reason that counts moves the device to FAILED, unless it has
  already settled (it runs, or has reverted, what the rollout gave it): then a
  later refusal -- a replayed desired state, say -- is a reason, not a lost
  install. The reason is kept after a later revert, so the report still says
  why it failed;
- FAILED with a *waiting* reason (`CONTROL_PLANE_UNREACHABLE`) is not a failure:
  the device gave up waiting for the control plane, not on the bundle. Its state
  stays where it was (it has not finished, so no gate counts it and the rollout
  waits for it), and the reason says why it waits until its next step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ota.domain.states import RANK, SETTLED

FAILED = "FAILED"
CONTROL_PLANE_UNREACHABLE = "CONTROL_PLANE_UNREACHABLE"

# Reasons a device gives for waiting, not for failing: never counted as failures.
WAITING_REASONS = frozenset({CONTROL_PLANE_UNREACHABLE})
# States in which a device has finished well; FAILED is the other way to finish.
FINISHED_OK = ("INSTALLED", "ACTIVE")


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one device stands in one rollout: its state and the reason it gave last.

    `reason` is the failure reason counted (kept after a revert), or a waiting
    reason while the device waits, or empty.
    """

    state: str
    reason: str = ""

    @property
    def failure(self) -> str:
        """The failure reason this standing counts ('' when none)."""
        return counted_failure(self.reason)

    @property
    def waiting(self) -> bool:
        """The device said it is waiting (for the control plane) and has not moved on since."""
        return self.reason in WAITING_REASONS


def counted_failure(reason: str) -> str:
    """`reason` if it counts as a failure of the rollout, else ''."""
    return "" if reason in WAITING_REASONS else reason


def is_waiting(reason: str) -> bool:
    """Whether a FAILED event with this reason means "still waiting", not "failed"."""
    return reason in WAITING_REASONS


def advance(current: Standing, event_state: str, event_reason: str = "") -> Standing:
    """The standing after the device reports `event_state` (with `event_reason` if FAILED)."""
    if event_state == FAILED:
        if event_reason in WAITING_REASONS:
            # Keep a real failure reason; otherwise say why the device waits.
            reason = current.reason if current.failure else event_reason
            return Standing(current.state, reason)
        state = current.state if current.state in SETTLED else FAILED
        return Standing(state, event_reason)
    # A step forward (or a revert): a wait is over, a failure reason stays.
    return Standing(event_state, current.failure)


def applies(seq: int, last_applied: int) -> bool:
    """Whether an event moves the device: only in its own sequence order, never backwards.

    A late or repeated event is kept as a fact, but does not move the standing.
    """
    return seq > last_applied


def furthest_rank(rank: int, event_state: str) -> int:
    """The furthest funnel step reached, after an event (outcomes reach no step)."""
    return max(rank, RANK.get(event_state, 0))


def failed(states: Mapping[str, int]) -> int:
    """Devices that finished by failing, from a count of devices by state."""
    return states.get(FAILED, 0)


def finished(states: Mapping[str, int]) -> int:
    """Devices that finished, well or not: what the gates and stage evidence count.

    A device waiting for the control plane is in an earlier state: not finished.
    """
    return failed(states) + sum(states.get(s, 0) for s in FINISHED_OK)
