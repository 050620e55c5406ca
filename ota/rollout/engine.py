"""The rollout engine: exposes stages, evaluates the gates, advances, completes.

Every decision happens inside one transaction that also records it in the
audit log, guarded by the rollout's revision. A control plane killed at any
point restarts from what was committed: stage starts are never repeated and
exposure is recomputed idempotently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from ota.clock import Clock, utc
from ota.domain import states
from ota.domain.plan import Gate, RolloutPlan
from ota.errors import Aborted
from ota.metrics import Metrics
from ota.rollout.exposure import (
    EXPOSE_BATCH,
    QuietRollouts,
    expose_current_stage,
    revert_exposed,
)
from ota.rollout.gates import ADOPTION_HEALTH, HealthSource, read_gate
from ota.rollout.notify import DesiredStateSigner, issue_desired_states
from ota.rollout.progress import read_progress
from ota.runtime import Signal, Worker
from ota.store import bundles, desired, rollouts
from ota.store.models import RolloutRow
from ota.store.session import Store

log = logging.getLogger(__name__)

ENGINE = "engine"
RENEW_BATCH = 500
# Ingested progress this close to the last tick waits for the rest of it: the first
# after a quiet spell runs a tick at once, a busy fleet's ingest at most 4 per second.
ENGINE_MIN_GAP_SECONDS = 0.25


class RolloutEngine:
    def __init__(
        self,
        store: Store,
        signer: DesiredStateSigner,
        clock: Clock,
        *,
        on_notify: Callable[[], None],
        desired_ttl: timedelta,
        interval: float = 2.0,
        health: HealthSource = ADOPTION_HEALTH,
        holds_lease: Callable[[], bool] | None = None,
        metrics: Metrics | None = None,
        on_change: Callable[[], None] = lambda: None,
        wake_on: Iterable[Signal] = (),
        coalesce_on: Iterable[Signal] = (),
    ) -> None:
        self._store = store
        self._metrics = metrics
        # Among replicas only the engine lease's holder ticks (`ota.rollout.lease`);
        # its store is then fenced, so a tick that outlives the lease writes nothing.
        self._holds_lease = holds_lease
        self._signer = signer
        self._clock = clock
        self._on_notify = on_notify
        # Called after a step committed a change to a rollout (watchers look again).
        self._on_change = on_change
        self._ttl = desired_ttl
        self._health = health
        self._quiet = QuietRollouts()
        self._again = False  # a step left work for right now (a full exposure batch)
        self._due: datetime | None = None  # the earliest soak end or deadline seen
        self._changed = False
        # Woken by commands, ingested progress and lease changes; `interval` is the
        # longest it waits anyway: for what is due by time (a maintenance window
        # opening, desired states to renew) and for what another replica committed.
        self._worker = Worker(
            "engine",
            self.tick,
            interval=interval,
            wake_on=wake_on,
            coalesce_on=coalesce_on,
            active=holds_lease,
            min_gap=ENGINE_MIN_GAP_SECONDS,
        )

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def wake(self) -> None:
        self._worker.wake()

    def tick(self) -> float | None:
        """Step every running rollout; returns the seconds until something is due, if known."""
        self._again, self._due = False, None
        self._renew_desired_states()
        with self._store.transaction() as session:
            running = [r.rollout_id for r in rollouts.rollouts_in(session, [states.RUNNING])]
        for rollout_id in running:
            self._changed = False
            try:
                with self._store.transaction() as session:
                    notified = self._step(session, rollouts.get_rollout(session, rollout_id))
            except Aborted:
                continue  # an operator's command won the race; look again next tick
            if notified:
                self._on_notify()
            if self._changed or notified:
                self._on_change()
        if self._again:
            return 0.0
        if self._due is None:
            return None
        return max(0.0, (self._due - self._clock.now()).total_seconds())

    def _due_at(self, when: datetime) -> None:
        if self._due is None or when < self._due:
            self._due = when

    def _renew_desired_states(self) -> None:
        """Re-sign desired states halfway through their life, so devices never hold an expired one."""
        now = self._clock.now()
        with self._store.transaction() as session:
            due = desired.issued_before(session, now - self._ttl / 2, RENEW_BATCH)
            renewed = issue_desired_states(session, due, self._signer, now=now, ttl=self._ttl)
        if renewed:
            log.info("renewed %d desired states before expiry", renewed)
            self._on_notify()

    def _step(self, session: Session, rollout: RolloutRow) -> int:
        if rollout.state != states.RUNNING or not rollouts.lock_if(
            session, rollout, states.RUNNING
        ):
            return 0  # a command changed it since it was read; look again next tick
        now = self._clock.now()
        plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
        bundle = bundles.get_bundle(session, rollout.bundle_name)
        if rollout.current_stage < 0:
            rollout = self._enter_stage(session, rollout, plan, 0)
        stage = plan.stages[rollout.current_stage]

        verdict = self._judge_gates(session, rollout, plan, now)
        rollout = verdict.rollout
        if verdict.stop is not None:
            return self._trip(session, rollout, verdict.stop, now)

        if not plan.exposure_allowed(now):
            self._set_phase(
                session,
                rollout,
                "deferred",
                f"outside the maintenance windows or on a blackout date ({now:%a %Y-%m-%d %H:%M}Z)",
                now,
            )
            return 0
        notified = expose_current_stage(
            session, rollout, bundle, plan, self._signer, now=now, ttl=self._ttl, quiet=self._quiet
        )
        if notified:
            self._changed = True
            rollouts.record(
                session,
                rollout,
                actor=ENGINE,
                action="expose",
                reason=f"notified {notified} devices at stage {rollout.current_stage + 1} "
                f"({stage.label})",
                now=now,
                diff={"notified": notified},
            )
        if notified == EXPOSE_BATCH:
            # A full batch: more of this stage may be waiting. Commit this one (the
            # publisher sends it meanwhile) and come back at once, before judging
            # whether the stage is done.
            self._again = True
            return notified
        if verdict.hold is not None:
            self._set_phase(session, rollout, "held", verdict.hold, now)
            return notified

        progress = read_progress(session, rollout.rollout_id)
        soaked = rollout.promoted or (
            rollout.stage_started_at is not None
            and now >= utc(rollout.stage_started_at) + timedelta(seconds=stage.min_soak_seconds)
        )
        if not soaked and rollout.stage_started_at is not None:
            self._due_at(utc(rollout.stage_started_at) + timedelta(seconds=stage.min_soak_seconds))
        last = rollout.current_stage + 1 == len(plan.stages)
        if last:
            if soaked and progress.finished == progress.exposed:
                # Complete only once every exposed device has finished, so the final
                # figures are final; stragglers keep the rollout RUNNING at 100 %.
                log.info(
                    "rollout %s completed: %d of %d exposed devices failed",
                    rollout.rollout_id,
                    progress.failed,
                    progress.exposed,
                    extra={"rollout_id": rollout.rollout_id},
                )
                self._changed = True
                rollouts.transition(
                    session,
                    rollout,
                    to_state=states.COMPLETED,
                    actor=ENGINE,
                    action="complete",
                    reason=(
                        f"all {len(plan.stages)} stages done: "
                        f"{progress.finished - progress.failed} installed, "
                        f"{progress.failed} failed of {progress.exposed} exposed"
                    ),
                    now=now,
                    phase="",
                )
            else:
                self._set_phase(session, rollout, "soaking", "", now)
            return notified

        # Advance on evidence from this stage's own devices, not earlier ones.
        this_stage = read_progress(session, rollout.rollout_id, stage=rollout.current_stage)
        needed = min(_evidence_needed(plan), this_stage.exposed)
        missing = []
        if not soaked:
            missing.append(f"soak of {stage.min_soak_seconds}s")
        if this_stage.finished < needed:
            missing.append(f"{needed - this_stage.finished} more finished devices")
        if progress.exposed < stage.min_exposed:
            missing.append(f"{stage.min_exposed - progress.exposed} more exposed devices")
        if missing:
            deadline = stage.deadline_seconds
            if (
                deadline
                and rollout.stage_started_at is not None
                and now >= utc(rollout.stage_started_at) + timedelta(seconds=deadline)
            ):
                reason = (
                    f"stage {rollout.current_stage + 1} ({stage.label}) missed its deadline of "
                    f"{deadline}s: still waiting for {', '.join(missing)}"
                )
                self._changed = True
                rollouts.transition(
                    session,
                    rollout,
                    to_state=states.PAUSED,
                    actor=ENGINE,
                    action="pause",
                    reason=reason,
                    now=now,
                    phase="",
                )
                log.warning(
                    "rollout %s: %s",
                    rollout.rollout_id,
                    reason,
                    extra={"rollout_id": rollout.rollout_id},
                )
            else:
                if deadline and rollout.stage_started_at is not None:
                    self._due_at(utc(rollout.stage_started_at) + timedelta(seconds=deadline))
                self._set_phase(session, rollout, "soaking", "", now)
            return notified
        if stage.advance == "approval" and not rollout.promoted:
            self._set_phase(
                session,
                rollout,
                "awaiting_approval",
                f"stage {rollout.current_stage + 1} ({stage.label}) is ready: "
                f"{this_stage.finished} of {this_stage.exposed} finished, "
                f"{this_stage.failed} failed; `ota rollout promote` to go on",
                now,
            )
            return notified
        self._enter_stage(session, rollout, plan, rollout.current_stage + 1)
        self._again = True  # expose the next stage now rather than a tick later
        return notified

    def _judge_gates(
        self, session: Session, rollout: RolloutRow, plan: RolloutPlan, now: datetime
    ) -> _Verdict:
        """Read every gate, count breaches on new evidence, and say what must happen."""
        state: dict[str, Any] = dict(rollout.gate_state or {})
        stop: tuple[Gate, str, dict[str, Any]] | None = None
        hold: str | None = None
        changed = False
        for index, gate in enumerate(plan.gates):
            reading = read_gate(session, rollout, gate, self._health, now)
            if self._metrics is not None:
                self._metrics.gate_read(gate.metric, breached=reading.breached)
            key = f"{index}:{gate.key}"
            streak = dict(state.get(key, {"n": 0, "sample": -1, "told": False}))
            if not reading.breached:
                fresh = {"n": 0, "sample": -1, "told": False}
                if streak != fresh:
                    state[key], changed = fresh, True
                continue
            if reading.sample != streak["sample"]:  # a breach counts once per new evidence
                streak = {"n": streak["n"] + 1, "sample": reading.sample, "told": streak["told"]}
                state[key], changed = streak, True
            if streak["n"] < gate.breaches_to_trip:
                continue
            reason = (
                f"{gate.metric.replace('_', '-')} gate tripped (gate {index + 1}, "
                f"{streak['n']} breach(es) in a row): {reading.describe()}"
            )
            figures = {"gate": index, **reading.figures(), "breaches": streak["n"]}
            if gate.observe_only:
                if not streak["told"]:
                    state[key] = {**streak, "told": True}
                    changed = True
                    self._changed = True
                    rollouts.record(
                        session,
                        rollout,
                        actor=ENGINE,
                        action="gate-observed",
                        reason=f"{reason}; observe-only, would {gate.action}",
                        now=now,
                        diff={"figures": figures},
                    )
                continue
            if gate.action == "hold":
                hold = hold or reason
            elif stop is None or (gate.action == "rollback" and stop[0].action != "rollback"):
                stop = (gate, reason, figures)
        if changed:
            self._changed = True
            rollouts.set_quietly(session, rollout, gate_state=state)
        return _Verdict(rollout, stop, hold)

    def _trip(
        self,
        session: Session,
        rollout: RolloutRow,
        stop: tuple[Gate, str, dict[str, Any]],
        now: datetime,
    ) -> int:
        gate, reason, figures = stop
        notified = 0
        to_state = states.ROLLED_BACK if gate.action == "rollback" else states.PAUSED
        self._changed = True
        rollouts.transition(
            session,
            rollout,
            to_state=to_state,
            actor=ENGINE,
            action=gate.action,
            reason=reason,
            now=now,
            diff={"figures": figures},
            phase="",
        )
        if gate.action == "rollback":
            notified = revert_exposed(session, rollout, self._signer, now=now, ttl=self._ttl)
        if self._metrics is not None:
            self._metrics.gate_tripped(gate.metric, gate.action)
        log.warning(
            "rollout %s: %s", rollout.rollout_id, reason, extra={"rollout_id": rollout.rollout_id}
        )
        return notified

    def _set_phase(
        self, session: Session, rollout: RolloutRow, phase: str, reason: str, now: datetime
    ) -> RolloutRow:
        """Record what a running rollout waits for; entering or leaving a wait is audited."""
        if rollout.phase == phase:
            return rollout
        if phase in AUDITED_PHASES or rollout.phase in AUDITED_PHASES:
            self._changed = True
            return rollouts.transition(
                session,
                rollout,
                to_state=states.RUNNING,
                actor=ENGINE,
                action=phase if phase in AUDITED_PHASES else f"end-{rollout.phase}",
                reason=reason or f"no longer {rollout.phase.replace('_', ' ')}",
                now=now,
                phase=phase,
            )
        self._changed = True
        rollouts.set_quietly(session, rollout, phase=phase)
        return rollout

    def _enter_stage(
        self, session: Session, rollout: RolloutRow, plan: RolloutPlan, index: int
    ) -> RolloutRow:
        stage = plan.stages[index]
        log.info(
            "rollout %s entering stage %d of %d (%s)",
            rollout.rollout_id,
            index + 1,
            len(plan.stages),
            stage.label,
            extra={"rollout_id": rollout.rollout_id, "stage": index + 1},
        )
        self._changed = True
        return rollouts.transition(
            session,
            rollout,
            to_state=states.RUNNING,
            actor=ENGINE,
            action="advance",
            reason=(
                f"stage {index + 1} of {len(plan.stages)}: {stage.label}, "
                f"soak {stage.min_soak_seconds}s"
                + (", advances on approval" if stage.advance == "approval" else "")
            ),
            now=self._clock.now(),
            current_stage=index,
            stage_started_at=self._clock.now(),
            promoted=False,
            phase="exposing",
            gate_state={},
        )


AUDITED_PHASES = ("deferred", "held", "awaiting_approval")


@dataclass(frozen=True)
class _Verdict:
    rollout: RolloutRow
    stop: tuple[Gate, str, dict[str, Any]] | None
    hold: str | None


def _evidence_needed(plan: RolloutPlan) -> int:
    """How many of a stage's devices must finish before it advances: the gates' minimum sample."""
    samples = [g.min_sample for g in plan.gates if g.metric == "install_failure"]
    return min(samples) if samples else 1
