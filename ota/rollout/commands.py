"""What operators ask of a rollout: create, edit, delete, start, pause, resume, promote,
abort, rollback, kill. Each runs in one transaction with its audit entry (actor, reason,
diff)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlmodel import Session

from ota.clock import Clock
from ota.domain import states
from ota.domain.plan import RolloutPlan
from ota.domain.selector import Selector
from ota.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from ota.metrics import Metrics
from ota.rollout.exposure import deactivate_exposed, revert_exposed
from ota.rollout.notify import DesiredStateSigner
from ota.store import bundles, rollouts
from ota.store.models import RolloutRow
from ota.store.session import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewRollout:
    feature: str
    version: str
    selector: str
    plan: RolloutPlan
    request_id: str

    def fingerprint(self) -> str:
        body = "\x00".join(
            [
                self.feature,
                self.version,
                self.selector,
                self.plan.stages_json(),
                self.plan.gate_json(),
            ]
        )
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Actor:
    """Who asks: the audit log's name and the role that decides what they may do."""

    name: str
    role: str = ""


# command -> (states it is allowed from, state it leads to)
_MOVES: dict[str, tuple[tuple[str, ...], str]] = {
    "start": ((states.DRAFT,), states.RUNNING),
    "pause": ((states.RUNNING,), states.PAUSED),
    "resume": ((states.PAUSED,), states.RUNNING),
    "promote": ((states.RUNNING,), states.RUNNING),
    "abort": ((states.RUNNING, states.PAUSED), states.ABORTED),
    "rollback": (
        (states.RUNNING, states.PAUSED, states.COMPLETED, states.ABORTED),
        states.ROLLED_BACK,
    ),
    # The kill switch needs no approval and works from any state that exposed devices.
    "kill": (
        (states.RUNNING, states.PAUSED, states.COMPLETED, states.ABORTED, states.ROLLED_BACK),
        states.KILLED,
    ),
}
ADMIN_ROLE = "admin"


class RolloutCommands:
    def __init__(
        self,
        store: Store,
        signer: DesiredStateSigner,
        clock: Clock,
        *,
        desired_ttl: timedelta,
        on_change: Callable[[], None],
        metrics: Metrics | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._signer = signer
        self._clock = clock
        self._ttl = desired_ttl
        self._on_change = on_change

    def create(self, new: NewRollout, *, actor: str) -> RolloutRow:
        Selector.parse(new.selector)
        now = self._clock.now()
        with self._store.transaction() as session:
            if new.request_id:
                earlier = rollouts.rollout_by_request(session, new.request_id)
                if earlier is not None:
                    if earlier.state == states.DELETED:
                        # A retried create must not bring back what an operator deleted.
                        raise AlreadyExists(
                            f"request_id {new.request_id!r} created rollout "
                            f"{earlier.rollout_id}, which was deleted; use a new request_id "
                            f"(`ota rollout history {earlier.rollout_id}` shows the deletion)",
                            field="request_id",
                        )
                    if earlier.request_hash != new.fingerprint():
                        raise InvalidArgument(
                            f"request_id {new.request_id!r} was used for a different rollout "
                            f"({earlier.rollout_id})",
                            field="request_id",
                        )
                    return earlier
            bundle = bundles.get_bundle(session, bundles.bundle_name(new.feature, new.version))
            salt_hex = secrets.token_bytes(16).hex()
            if new.plan.salt_from:
                salt_hex = self._salt_of(session, new.plan.salt_from, new.feature)
            row = RolloutRow(
                rollout_id="r-" + secrets.token_hex(4),
                feature=new.feature,
                version=new.version,
                bundle_name=bundle.name,
                selector=new.selector,
                stages_json=new.plan.stages_json(),
                gate_json=new.plan.gate_json(),
                state=states.DRAFT,
                salt_hex=salt_hex,
                request_id=new.request_id or None,
                request_hash=new.fingerprint(),
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            rollouts.record(
                session,
                row,
                actor=actor,
                action="create",
                reason=f"plan version 1 of {new.feature} {new.version}",
                now=now,
                diff={"selector": new.selector, "plan": new.plan.to_dict()},
            )
            return row

    @staticmethod
    def _salt_of(session: Session, rollout_id: str, feature: str) -> str:
        try:
            earlier = rollouts.get_rollout(session, rollout_id)
        except NotFound as exc:
            raise InvalidArgument(
                f"rollout {rollout_id!r} does not exist", field="salt_from"
            ) from exc
        if earlier.feature != feature:
            raise InvalidArgument(
                f"rollout {rollout_id} is of feature {earlier.feature}, not {feature}: "
                "a salt is reused only within one feature",
                field="salt_from",
            )
        return earlier.salt_hex

    def edit(
        self,
        rollout_id: str,
        plan: RolloutPlan,
        *,
        actor: str,
        reason: str,
        etag: str = "",
    ) -> RolloutRow:
        """A new plan version: only stages after the current one change, never below it."""
        now = self._clock.now()
        with self._store.transaction() as session:
            rollout = rollouts.get_rollout(session, rollout_id)
            self._check_etag(rollout, etag)
            if rollout.state not in (states.DRAFT, *states.ROLLOUT_ACTIVE):
                raise FailedPrecondition(
                    f"cannot edit rollout {rollout_id}: it is {rollout.state}", field="rollout_id"
                )
            old = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
            check_edit(old, plan, rollout.current_stage)
            before, after = old.to_dict(), plan.to_dict()
            diff = {k: [before[k], after[k]] for k in after if before[k] != after[k]}
            if not diff:
                raise InvalidArgument("the new plan is the same as the current one", field="plan")
            result = rollouts.transition(
                session,
                rollout,
                to_state=rollout.state,
                actor=actor,
                action="edit",
                reason=reason or f"plan version {rollout.plan_version + 1} by {actor}",
                now=now,
                diff=diff,
                stages_json=plan.stages_json(),
                gate_json=plan.gate_json(),
                plan_version=rollout.plan_version + 1,
            )
        self._on_change()
        log.info(
            "rollout %s: plan edited by %s", rollout_id, actor, extra={"rollout_id": rollout_id}
        )
        return result

    def delete(self, rollout_id: str, *, actor: str, reason: str, etag: str = "") -> RolloutRow:
        """Delete a DRAFT: it exposed nobody, so nothing on any device changes.

        The row stays, in state DELETED, for its audit log and so that its
        request_id is never reused; every read but the audit log treats it as gone.
        """
        now = self._clock.now()
        with self._store.transaction() as session:
            rollout = rollouts.get_rollout(session, rollout_id)
            self._check_etag(rollout, etag)
            if rollout.state != states.DRAFT:
                raise FailedPrecondition(
                    f"cannot delete rollout {rollout_id}: it is {rollout.state}, and only a "
                    "DRAFT can be deleted (abort, roll back or kill a started rollout)",
                    field="rollout_id",
                )
            result = rollouts.transition(
                session,
                rollout,
                to_state=states.DELETED,
                actor=actor,
                action="delete",
                reason=reason or f"deleted by {actor}",
                now=now,
                diff={"feature": rollout.feature, "version": rollout.version},
            )
        self._on_change()
        log.info(
            "rollout %s (%s %s): deleted by %s: %s",
            rollout_id,
            result.feature,
            result.version,
            actor,
            reason or "no reason given",
            extra={"rollout_id": rollout_id, "reason": reason},
        )
        return result

    @staticmethod
    def _check_etag(rollout: RolloutRow, etag: str) -> None:
        if etag and etag != str(rollout.revision):
            raise Aborted(
                f"rollout {rollout.rollout_id} changed since you read it (etag {etag}, now "
                f"{rollout.revision}); read it again",
                field="etag",
            )

    def run(
        self,
        command: str,
        rollout_id: str,
        *,
        actor: str | Actor,
        reason: str,
        etag: str = "",
    ) -> RolloutRow:
        who = actor if isinstance(actor, Actor) else Actor(actor, ADMIN_ROLE)
        allowed_from, to_state = _MOVES[command]
        now = self._clock.now()
        with self._store.transaction() as session:
            rollout = rollouts.get_rollout(session, rollout_id)
            self._check_etag(rollout, etag)
            if rollout.state not in allowed_from:
                raise FailedPrecondition(
                    f"cannot {command} rollout {rollout_id}: it is {rollout.state}, "
                    f"and {command} needs {' or '.join(allowed_from)}",
                    field="rollout_id",
                )
            if command == "start":
                self._check_no_conflict(session, rollout)
            changes: dict[str, Any] = {}
            if command == "promote":
                self._check_approver(rollout, who)
                changes["promoted"] = True
            elif command == "resume":
                # A fresh soak and gate window; breaches before the pause are forgotten.
                changes |= {"stage_started_at": now, "gate_state": {}, "phase": ""}
            elif command in ("pause", "abort", "rollback", "kill"):
                changes["phase"] = ""
            result = rollouts.transition(
                session,
                rollout,
                to_state=to_state,
                actor=who.name,
                action=command,
                reason=reason or f"{command} by {who.name}",
                now=now,
                **changes,
            )
            if command == "rollback":
                revert_exposed(session, rollout, self._signer, now=now, ttl=self._ttl)
            elif command == "kill":
                deactivate_exposed(session, rollout, self._signer, now=now, ttl=self._ttl)
        self._on_change()
        if self._metrics is not None and command == "rollback":
            self._metrics.rolled_back()
        elif self._metrics is not None and command == "kill":
            self._metrics.killed()
        log.info(
            "rollout %s: %s by %s", rollout_id, command, who.name, extra={"rollout_id": rollout_id}
        )
        return result

    @staticmethod
    def _check_approver(rollout: RolloutRow, who: Actor) -> None:
        """At a stage that advances on approval, only admin or a plan's approver may promote."""
        plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
        stage = plan.stages[rollout.current_stage] if rollout.current_stage >= 0 else None
        if stage is None or stage.advance != "approval":
            return
        if who.role == ADMIN_ROLE or {who.role, who.name} & set(plan.approvers):
            return
        allowed = ", ".join(["admin", *plan.approvers])
        raise PermissionDenied(
            f"stage {rollout.current_stage + 1} of rollout {rollout.rollout_id} advances on "
            f"approval: {who.name} ({who.role}) may not approve it; ask one of: {allowed}",
            field="rollout_id",
        )

    def _check_no_conflict(self, session: Session, rollout: RolloutRow) -> None:
        """Refuse a second running rollout of a feature whose eligibility may overlap.

        Judged on the selectors, not today's fleet: a device registered later
        must never fall into two rollouts of one feature.
        """
        mine = Selector.parse(rollout.selector)
        for other in rollouts.rollouts_in(session, states.ROLLOUT_ACTIVE):
            if other.feature != rollout.feature or other.rollout_id == rollout.rollout_id:
                continue
            if mine.may_overlap(Selector.parse(other.selector)):
                raise FailedPrecondition(
                    f"rollout {other.rollout_id} of {other.feature} is {other.state} and its "
                    f"devices may overlap ({other.selector or 'whole fleet'}); "
                    "abort or finish it first",
                    field="rollout_id",
                )


def check_edit(old: RolloutPlan, new: RolloutPlan, current_stage: int) -> None:
    """An edit changes only stages after the current one, and never goes below it.

    What decides who is exposed or compared (the holdout, the salt, the cohort)
    cannot change once a rollout exists: devices would silently switch sides.
    """
    if new.holdout_ppm != old.holdout_ppm:
        raise InvalidArgument("the holdout of an existing rollout is fixed", field="holdout")
    if new.salt_from != old.salt_from:
        raise InvalidArgument("the salt of an existing rollout is fixed", field="salt_from")
    if (new.cohort is None) != (old.cohort is None) or (
        new.cohort is not None and new.stages[0] != old.stages[0] and current_stage >= 0
    ):
        raise InvalidArgument("the cohort of an existing rollout is fixed", field="cohort")
    fixed = current_stage + 1  # stages up to and including the current one
    for i in range(min(fixed, len(old.stages))):
        if i >= len(new.stages) or new.stages[i] != old.stages[i]:
            what = "current" if i == current_stage else "past"
            offset = 1 if old.cohort is not None else 0
            raise InvalidArgument(
                f"stage {i + 1} is a {what} stage and cannot change (only stages after "
                f"stage {fixed} may be edited)",
                field="cohort" if i < offset else f"stages[{i - offset}]",
            )
