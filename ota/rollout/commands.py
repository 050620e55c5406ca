"""What operators ask of a rollout: create, start, pause, resume, promote, abort, rollback."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlmodel import Session

from ota.clock import Clock
from ota.domain import states
from ota.domain.plan import RolloutPlan
from ota.domain.selector import Selector
from ota.errors import Aborted, FailedPrecondition, InvalidArgument
from ota.rollout.exposure import revert_exposed
from ota.rollout.notify import DesiredStateSigner
from ota.store import bundles, rollouts
from ota.store.models import RolloutRow
from ota.store.session import Store


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
}


class RolloutCommands:
    def __init__(
        self,
        store: Store,
        signer: DesiredStateSigner,
        clock: Clock,
        *,
        desired_ttl: timedelta,
        on_change: Callable[[], None],
    ) -> None:
        self._store = store
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
                    if earlier.request_hash != new.fingerprint():
                        raise InvalidArgument(
                            f"request_id {new.request_id!r} was used for a different rollout "
                            f"({earlier.rollout_id})",
                            field="request_id",
                        )
                    return earlier
            bundle = bundles.get_bundle(session, bundles.bundle_name(new.feature, new.version))
            row = RolloutRow(
                rollout_id="r-" + secrets.token_hex(4),
                feature=new.feature,
                version=new.version,
                bundle_name=bundle.name,
                selector=new.selector,
                stages_json=new.plan.stages_json(),
                gate_json=new.plan.gate_json(),
                state=states.DRAFT,
                salt_hex=secrets.token_bytes(16).hex(),
                request_id=new.request_id or None,
                request_hash=new.fingerprint(),
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            rollouts.record(session, row, actor=actor, action="create", reason="", now=now)
            return row

    def run(
        self, command: str, rollout_id: str, *, actor: str, reason: str, etag: str = ""
    ) -> RolloutRow:
        allowed_from, to_state = _MOVES[command]
        now = self._clock.now()
        with self._store.transaction() as session:
            rollout = rollouts.get_rollout(session, rollout_id)
            if etag and etag != str(rollout.revision):
                raise Aborted(
                    f"rollout {rollout_id} changed since you read it (etag {etag}, now "
                    f"{rollout.revision}); read it again",
                    field="etag",
                )
            if rollout.state not in allowed_from:
                raise FailedPrecondition(
                    f"cannot {command} rollout {rollout_id}: it is {rollout.state}, "
                    f"and {command} needs {' or '.join(allowed_from)}",
                    field="rollout_id",
                )
            if command == "start":
                self._check_no_conflict(session, rollout)
            changes: dict[str, object] = {}
            if command == "promote":
                changes["promoted"] = True
            elif command == "resume":
                changes["stage_started_at"] = now  # a fresh soak and gate window
            result = rollouts.transition(
                session,
                rollout,
                to_state=to_state,
                actor=actor,
                action=command,
                reason=reason or f"{command} by {actor}",
                now=now,
                **changes,
            )
            if command == "rollback":
                revert_exposed(session, rollout, self._signer, now=now, ttl=self._ttl)
        self._on_change()
        return result

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
