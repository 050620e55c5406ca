"""RolloutService: thin translation between ota.v1 and the rollout commands."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
from google.protobuf.empty_pb2 import Empty
from sqlmodel import Session

from ota.api import convert
from ota.api.auth import Authenticator
from ota.api.paging import page_after, page_size, page_token
from ota.api.readmodel import RolloutReadModel
from ota.domain import states
from ota.domain.plan import Gate, RolloutPlan, Stage, install_failure_gate
from ota.domain.plan_document import parse_plan_document
from ota.errors import InvalidArgument
from ota.rollout.commands import Actor, NewRollout, RolloutCommands
from ota.rollout.exposure import holdout_count, reported_eligible
from ota.rollout.preview import preview_rollout
from ota.store import bundles, rollouts
from ota.store import changes as store_changes
from ota.store.models import RolloutRow
from ota.store.session import Store
from ota.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

MAX_REQUEST_ID = 128  # the width of the stored request_id
WATCH_POLL_SECONDS = 2.0
WATCH_COALESCE_SECONDS = 0.25

_ACTIONS = {
    rollout_pb2.GATE_ACTION_UNSPECIFIED: "pause",
    rollout_pb2.GATE_ACTION_PAUSE: "pause",
    rollout_pb2.GATE_ACTION_HOLD: "hold",
    rollout_pb2.GATE_ACTION_ROLLBACK: "rollback",
}


def _new_rollout(request: rollout_pb2.CreateRolloutRequest) -> NewRollout:
    """From a plan document, or from the flat fields (what `--stages` builds)."""
    if len(request.request_id) > MAX_REQUEST_ID or not request.request_id.isprintable():
        raise InvalidArgument(
            f"must be at most {MAX_REQUEST_ID} printable characters (a UUID, say)",
            field="request_id",
        )
    if request.plan_document:
        given = {
            "feature": bool(request.feature),
            "version": bool(request.version),
            "selector": bool(request.selector),
            "stages": bool(request.stages),
            "gate": request.HasField("gate"),
        }
        for name, present in given.items():
            if present:
                raise InvalidArgument(
                    "comes from the plan document; leave it empty when plan_document is set",
                    field=name,
                )
        document = parse_plan_document(request.plan_document)
        return NewRollout(
            document.feature,
            document.version,
            document.selector,
            document.plan,
            request.request_id,
        )
    if not request.feature:
        raise InvalidArgument("is required", field="feature")
    if not request.version:
        raise InvalidArgument("is required", field="version")
    gate = _flat_gate(request) if request.HasField("gate") else install_failure_gate()
    # The same bounds as a plan document's, named as the request's fields.
    stages = tuple(
        Stage(
            s.ppm,
            s.min_soak_seconds,
            min_exposed=s.min_exposed,
            deadline_seconds=s.deadline_seconds,
            advance=s.advance or "auto",
            name=s.name,
        )
        for s in request.stages
    )
    plan = RolloutPlan(stages, (gate,))
    return NewRollout(request.feature, request.version, request.selector, plan, request.request_id)


_GATE_FIELDS = {"max": "max_failure_ppm", "min_sample": "min_sample", "action": "action"}


def _flat_gate(request: rollout_pb2.CreateRolloutRequest) -> Gate:
    try:
        return install_failure_gate(
            max_failure_ppm=request.gate.max_failure_ppm,
            min_sample=request.gate.min_sample,
            action=_ACTIONS.get(request.gate.action, "pause"),
        )
    except InvalidArgument as exc:
        name = _GATE_FIELDS.get(exc.field or "", exc.field or "")
        raise InvalidArgument(exc.message, field=f"gate.{name}") from exc


def _message(session: Session, row: RolloutRow) -> rollout_pb2.Rollout:
    """The API's view of a rollout, from its row and its progress rows; no fleet scan.

    The eligible count of a running or finished rollout is the one the engine
    maintains; only a draft is counted (one COUNT in SQL).
    """
    bundle = bundles.get_bundle(session, row.bundle_name)
    by_state, by_stage = rollouts.state_and_stage_counts(session, row.rollout_id)
    eligible = reported_eligible(session, row, bundle)
    return convert.rollout(
        row,
        device_states=by_state,
        stage_exposure=by_stage,
        eligible=eligible,
        holdout=holdout_count(session, row, bundle, eligible),
        stage_started=rollouts.stage_start_times(session, row.rollout_id),
    )


# Filter values of ListRolloutDevices: UNSPECIFIED means every state.
_DEVICE_STATES = {common_pb2.DeviceState.Value(name): name for name in states.ALL_STATES} | {
    common_pb2.DEVICE_STATE_UNSPECIFIED: ""
}


class RolloutChanges:
    """Wakes WatchRollout streams when anything about rollouts may have changed."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 0

    def notify(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._version != seen, timeout)
            return self._version


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(
        self,
        store: Store,
        commands: RolloutCommands,
        changes: RolloutChanges,
        auth: Authenticator,
        *,
        cache_seconds: float = 1.0,
    ) -> None:
        self._auth = auth
        self._store = store
        self._commands = commands
        self._changes = changes
        # GetRollout's answers: this process's commits drop what they changed;
        # other replicas' arrive by `ota.api.freshness`.
        self.views = RolloutReadModel(self._load, max_age=cache_seconds)
        store_changes.subscribe(store.engine, store_changes.ROLLOUTS, self.views.invalidate_many)

    def _load(self, rollout_id: str) -> rollout_pb2.Rollout:
        with self._store.transaction() as session:
            return _message(session, rollouts.get_rollout(session, rollout_id))

    def _full(self, row: RolloutRow) -> rollout_pb2.Rollout:
        with self._store.transaction() as session:
            return _message(session, rollouts.get_rollout_or_deleted(session, row.rollout_id))

    def CreateRollout(
        self, request: rollout_pb2.CreateRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        new = _new_rollout(request)
        actor = request.actor or self._auth.caller(context).name
        return self._full(self._commands.create(new, actor=actor))

    def EditRollout(
        self, request: rollout_pb2.EditRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        if not request.rollout_id:
            raise InvalidArgument("is required", field="rollout_id")
        document = parse_plan_document(request.plan_document)
        with self._store.transaction() as session:
            row = rollouts.get_rollout(session, request.rollout_id)
        for name in ("feature", "version", "selector"):
            if getattr(document, name) != getattr(row, name):
                raise InvalidArgument(
                    f"cannot change from {getattr(row, name)!r} to {getattr(document, name)!r}: "
                    "create a new rollout instead",
                    field=name,
                )
        row = self._commands.edit(
            request.rollout_id,
            document.plan,
            actor=self._auth.caller(context).name,
            reason=request.reason,
            etag=request.etag,
        )
        self._changes.notify()
        return self._full(row)

    def PlanRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutPlanPreview:
        with self._store.transaction() as session:
            return convert.plan_preview(preview_rollout(session, request.rollout_id))

    def GetRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self.views.get(request.rollout_id)

    def ListRollouts(
        self, request: rollout_pb2.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ListRolloutsResponse:
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope=request.feature)
        with self._store.transaction() as session:
            rows = rollouts.list_rollouts(
                session,
                request.feature,
                after=after,
                limit=size + 1,
                show_deleted=request.show_deleted,
            )
        more = len(rows) > size
        rows = rows[:size]
        return rollout_pb2.ListRolloutsResponse(
            rollouts=[self._full(r) for r in rows],
            next_page_token=page_token(rows[-1].rollout_id, scope=request.feature) if more else "",
        )

    def _command(
        self, name: str, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        if not request.rollout_id:
            raise InvalidArgument("is required", field="rollout_id")
        caller = self._auth.caller(context)
        row = self._commands.run(
            name,
            request.rollout_id,
            actor=Actor(caller.name, caller.role),
            reason=request.reason,
            etag=request.etag,
        )
        self._changes.notify()
        return self._full(row)

    def StartRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("start", request, context)

    def PauseRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("pause", request, context)

    def ResumeRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("resume", request, context)

    def PromoteRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("promote", request, context)

    def AbortRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("abort", request, context)

    def RollbackRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("rollback", request, context)

    def KillRollout(
        self, request: rollout_pb2.RolloutCommandRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._command("kill", request, context)

    def DeleteRollout(
        self, request: rollout_pb2.DeleteRolloutRequest, context: grpc.ServicerContext
    ) -> Empty:
        if not request.rollout_id:
            raise InvalidArgument("is required", field="rollout_id")
        self._commands.delete(
            request.rollout_id,
            actor=self._auth.caller(context).name,
            reason=request.reason,
            etag=request.etag,
        )
        self._changes.notify()
        return Empty()

    def ListRolloutEvents(
        self, request: rollout_pb2.ListRolloutEventsRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ListRolloutEventsResponse:
        with self._store.transaction() as session:
            rollouts.get_rollout_or_deleted(session, request.rollout_id)
            entries = rollouts.audit_log(session, request.rollout_id)
        return rollout_pb2.ListRolloutEventsResponse(events=[convert.audit(e) for e in entries])

    def ListRolloutDevices(
        self, request: rollout_pb2.ListRolloutDevicesRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ListRolloutDevicesResponse:
        state = _DEVICE_STATES.get(request.state)
        if state is None:
            raise InvalidArgument(f"{request.state} is not a device state", field="state")
        size = page_size(request.page_size)
        scope = f"{request.rollout_id}/{state}"
        after = page_after(request.page_token, scope=scope)
        with self._store.transaction() as session:
            rollouts.get_rollout(session, request.rollout_id)
            rows, total = rollouts.rollout_devices(
                session, request.rollout_id, state, after=after, limit=size + 1
            )
            more = len(rows) > size
            rows = rows[:size]
            details = rollouts.last_details(
                session, request.rollout_id, [r.device_id for r in rows]
            )
        return rollout_pb2.ListRolloutDevicesResponse(
            devices=[convert.rollout_device(r, details.get(r.device_id, "")) for r in rows],
            next_page_token=page_token(rows[-1].device_id, scope=scope) if more else "",
            total_size=total,
        )

    def WatchRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> Iterator[rollout_pb2.RolloutUpdate]:
        last_audit = 0
        seen = -1
        previous: bytes = b""
        while context.is_active():
            with self._store.transaction() as session:
                row = rollouts.get_rollout(session, request.rollout_id)
                entries = rollouts.audit_log(session, request.rollout_id, after_id=last_audit)
                current = _message(session, row)
            fingerprint = current.SerializeToString(deterministic=True)
            if entries or fingerprint != previous:
                last_audit = entries[-1].id or last_audit if entries else last_audit
                previous = fingerprint
                yield rollout_pb2.RolloutUpdate(
                    rollout=current, events=[convert.audit(e) for e in entries]
                )
            if row.state in states.ROLLOUT_FINAL:
                return
            # Commands, the engine and ingested progress of this process wake it; the
            # poll is for what another replica committed, which nothing here announces.
            seen = self._changes.wait(seen, timeout=WATCH_POLL_SECONDS)
            # A busy fleet's ingest signals many times a second: one look serves them all.
            time.sleep(WATCH_COALESCE_SECONDS)
