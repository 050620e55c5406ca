"""The rollout engine: exposes stages, evaluates the gate, advances, completes.

Every decision happens inside one transaction that also records it in the
audit log, guarded by the rollout's revision. A control plane killed at any
point restarts from what was committed: stage starts are never repeated and
exposure is recomputed idempotently.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlmodel import Session

from ota.clock import Clock, utc
from ota.domain import states
from ota.domain.plan import RolloutPlan
from ota.errors import Aborted, OtaError
from ota.rollout.exposure import expose_current_stage, revert_exposed
from ota.rollout.notify import DesiredStateSigner, issue_desired_states
from ota.rollout.progress import read_progress
from ota.store import bundles, desired, rollouts
from ota.store.models import RolloutRow
from ota.store.session import Store

log = logging.getLogger(__name__)

ENGINE = "engine"
RENEW_BATCH = 500


def _pct(ppm: int) -> str:
    return f"{ppm / 10_000:g}%"


class RolloutEngine:
    def __init__(
        self,
        store: Store,
        signer: DesiredStateSigner,
        clock: Clock,
        *,
        on_notify: Callable[[], None],
        desired_ttl: timedelta,
        interval: float = 0.25,
    ) -> None:
        self._store = store
        self._signer = signer
        self._clock = clock
        self._on_notify = on_notify
        self._ttl = desired_ttl
        self._interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ota-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except OtaError as exc:
                log.warning("engine tick deferred: %s", exc)
            except Exception:
                log.exception("engine tick failed")
            self._wake.wait(self._interval)
            self._wake.clear()

    def tick(self) -> None:
        self._renew_desired_states()
        with self._store.transaction() as session:
            running = [r.rollout_id for r in rollouts.rollouts_in(session, [states.RUNNING])]
        for rollout_id in running:
            try:
                with self._store.transaction() as session:
                    notified = self._step(session, rollouts.get_rollout(session, rollout_id))
            except Aborted:
                continue  # an operator's command won the race; look again next tick
            if notified:
                self._on_notify()

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
        notified = expose_current_stage(
            session, rollout, bundle, stage.ppm, self._signer, now=now, ttl=self._ttl
        )
        if notified:
            rollouts.record(
                session,
                rollout,
                actor=ENGINE,
                action="expose",
                reason=f"notified {notified} devices at {_pct(stage.ppm)}",
                now=now,
            )
        progress = read_progress(session, rollout.rollout_id)
        # The gate judges outcomes since the current stage started (or the rollout was
        # resumed): a resume after a trip is a decision to look at fresh evidence.
        window = read_progress(session, rollout.rollout_id, changed_since=rollout.stage_started_at)
        gate = plan.gate
        if gate.breached(window.failed, window.finished):
            rate = window.failed / window.finished
            reason = (
                f"install-failure gate tripped: {window.failed} of {window.finished} finished "
                f"devices failed ({rate:.1%} > {_pct(gate.max_failure_ppm)}, "
                f"min sample {gate.min_sample})"
            )
            if gate.action == "rollback":
                rollouts.transition(
                    session,
                    rollout,
                    to_state=states.ROLLED_BACK,
                    actor=ENGINE,
                    action="rollback",
                    reason=reason,
                    now=now,
                )
                notified += revert_exposed(session, rollout, self._signer, now=now, ttl=self._ttl)
            else:
                rollouts.transition(
                    session,
                    rollout,
                    to_state=states.PAUSED,
                    actor=ENGINE,
                    action="pause",
                    reason=reason,
                    now=now,
                )
            log.warning("rollout %s: %s", rollout.rollout_id, reason)
            return notified
        soaked = rollout.promoted or (
            rollout.stage_started_at is not None
            and now >= utc(rollout.stage_started_at) + timedelta(seconds=stage.min_soak_seconds)
        )
        if not soaked:
            return notified
        if rollout.current_stage + 1 < len(plan.stages):
            # Advance on evidence from this stage's own devices, not earlier ones.
            this_stage = read_progress(session, rollout.rollout_id, stage=rollout.current_stage)
            if this_stage.finished >= min(gate.min_sample, this_stage.exposed):
                self._enter_stage(session, rollout, plan, rollout.current_stage + 1)
                self.wake()  # expose the next stage now rather than a tick later
        elif progress.finished == progress.exposed:
            # Complete only once every exposed device has finished, so the final
            # figures are final; stragglers keep the rollout RUNNING at 100 %.
            rollouts.transition(
                session,
                rollout,
                to_state=states.COMPLETED,
                actor=ENGINE,
                action="complete",
                reason=(
                    f"all {len(plan.stages)} stages done: {progress.finished - progress.failed} "
                    f"installed, {progress.failed} failed of {progress.exposed} exposed"
                ),
                now=now,
            )
        return notified

    def _enter_stage(
        self, session: Session, rollout: RolloutRow, plan: RolloutPlan, index: int
    ) -> RolloutRow:
        stage = plan.stages[index]
        return rollouts.transition(
            session,
            rollout,
            to_state=states.RUNNING,
            actor=ENGINE,
            action="advance",
            reason=(
                f"stage {index + 1} of {len(plan.stages)}: {_pct(stage.ppm)}, "
                f"soak {stage.min_soak_seconds}s"
            ),
            now=self._clock.now(),
            current_stage=index,
            stage_started_at=self._clock.now(),
            promoted=False,
        )
