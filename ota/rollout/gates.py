"""Gates: read the evidence each gate of a plan judges, and say what it shows.

Install failures and offline devices come from the rollout's progress rows and
the fleet. Post-activation health (crash and feature-error rates) comes from a
`HealthSource`, for the exposed devices and for the holdout. The one wired in,
`ADOPTION_HEALTH`, reads the per-minute health sums ingest keeps per rollout
(`ota.store.adoption`): rates are per health sample, from the minute the gate's
window opens in. The exposed side counts samples of devices the rollout exposed
while they run its version; the control side counts samples of the devices in
its holdout, which devices send without knowing they are held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlmodel import Session

from ota.clock import utc
from ota.domain.plan import Gate
from ota.rollout.progress import read_progress
from ota.store import adoption, rollouts
from ota.store.models import RolloutRow


@dataclass(frozen=True)
class HealthFigures:
    """Health samples since a moment, and how many crashes / feature errors they report."""

    sampled: int = 0
    crashing: int = 0
    erroring: int = 0


class HealthSource(Protocol):
    def health(
        self, session: Session, rollout: RolloutRow, *, since: datetime, control: bool
    ) -> HealthFigures:
        """Health of the rollout's exposed devices (or, with `control`, of its holdout)."""
        ...


class _NoHealthSamples:
    def health(
        self, session: Session, rollout: RolloutRow, *, since: datetime, control: bool
    ) -> HealthFigures:
        return HealthFigures()


NO_HEALTH_SAMPLES: HealthSource = _NoHealthSamples()


class _AdoptionHealth:
    def health(
        self, session: Session, rollout: RolloutRow, *, since: datetime, control: bool
    ) -> HealthFigures:
        totals = adoption.health_since(session, rollout.rollout_id, control=control, since=since)
        return HealthFigures(
            sampled=totals.get("samples", 0),
            crashing=totals.get("crashes", 0),
            erroring=totals.get("feature_errors", 0),
        )


ADOPTION_HEALTH: HealthSource = _AdoptionHealth()


@dataclass(frozen=True)
class GateReading:
    gate: Gate
    bad: int
    sample: int
    control_bad: int = 0
    control_sample: int = 0

    @property
    def breached(self) -> bool:
        return self.gate.breached(
            self.bad,
            self.sample,
            control_bad=self.control_bad,
            control_sample=self.control_sample,
        )

    def figures(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {
            "metric": self.gate.metric,
            "bad": self.bad,
            "sample": self.sample,
            "rate_ppm": _ppm(self.bad, self.sample),
            "max_ppm": self.gate.max_ppm,
            "min_sample": self.gate.min_sample,
        }
        if self.gate.versus_holdout:
            out |= {
                "control_bad": self.control_bad,
                "control_sample": self.control_sample,
                "control_rate_ppm": _ppm(self.control_bad, self.control_sample),
            }
        return out

    def describe(self) -> str:
        rate = f"{self.bad / self.sample:.1%}" if self.sample else "n/a"
        text = (
            f"{self.bad} of {self.sample} {_WHAT[self.gate.metric]} ({rate}; max "
            f"{self.gate.max_ppm / 10_000:g}%, min sample {self.gate.min_sample})"
        )
        if self.gate.versus_holdout:
            control = (
                f"{self.control_bad / self.control_sample:.1%}" if self.control_sample else "n/a"
            )
            text += f" vs {self.control_bad} of {self.control_sample} in the holdout ({control})"
        return text


def _ppm(bad: int, sample: int) -> int:
    """A rate in parts per million (0 without a sample), as the audit log records it."""
    return bad * 1_000_000 // sample if sample else 0


_WHAT = {
    "install_failure": "finished devices failed",
    "offline_ratio": "exposed devices offline",
    "crash_rate": "health samples reported a crash",
    "feature_error_rate": "health samples reported a feature error",
}


def window_start(rollout: RolloutRow, gate: Gate, now: datetime) -> datetime:
    """Evidence counts from the stage start (or resume), or the gate's window if shorter."""
    start = utc(rollout.stage_started_at) if rollout.stage_started_at else now
    if gate.window_seconds:
        return max(start, now - timedelta(seconds=gate.window_seconds))
    return start


def read_gate(
    session: Session, rollout: RolloutRow, gate: Gate, health: HealthSource, now: datetime
) -> GateReading:
    since = window_start(rollout, gate, now)
    if gate.metric == "install_failure":
        window = read_progress(session, rollout.rollout_id, changed_since=since)
        return GateReading(gate, window.failed, window.finished)
    if gate.metric == "offline_ratio":
        offline, exposed = rollouts.offline_counts(session, rollout.rollout_id)
        return GateReading(gate, offline, exposed)
    treated = health.health(session, rollout, since=since, control=False)
    control = (
        health.health(session, rollout, since=since, control=True)
        if gate.versus_holdout
        else HealthFigures()
    )
    if gate.metric == "crash_rate":
        return GateReading(
            gate, treated.crashing, treated.sampled, control.crashing, control.sampled
        )
    return GateReading(gate, treated.erroring, treated.sampled, control.erroring, control.sampled)
