"""Operator commands on a live rollout: pause, resume, promote, abort, rollback, etags, request ids."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import rollout_pb2
from tests.e2e.scenario import publish, report, report_states, start_fleet, wait_for

pytestmark = pytest.mark.e2e


def _create(
    client: Client, version: str, *, request_id: str = "", soak: int = 3600, selector: str = ""
) -> rollout_pb2.Rollout:
    r: rollout_pb2.Rollout = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version=version,
            selector=selector,
            stages=[
                rollout_pb2.Stage(ppm=300_000, min_soak_seconds=soak),
                rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=0),
            ],
            request_id=request_id,
        ),
        metadata=client.metadata,
    )
    return r


def _do(client: Client, verb: str, rollout_id: str, etag: str = "") -> rollout_pb2.Rollout:
    method = getattr(client.rollouts, f"{verb}Rollout")
    r: rollout_pb2.Rollout = method(
        rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id, etag=etag, reason=f"test {verb}"),
        metadata=client.metadata,
    )
    return r


def _get(client: Client, rollout_id: str) -> rollout_pb2.Rollout:
    r: rollout_pb2.Rollout = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return r


def _refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    assert e.value.code() == code, e.value.details()
    return e.value.details() or ""


def test_pause_resume_promote_and_the_audit_log(stack: DevStack, tmp_path: Path) -> None:
    fleet = start_fleet(stack, tmp_path, 30)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        first = _create(client, "1.0.0", request_id="req-1")
        # The same request again is the same rollout; a different body under the id is refused.
        assert _create(client, "1.0.0", request_id="req-1").rollout_id == first.rollout_id
        details = _refused(
            lambda: _create(client, "1.0.0", request_id="req-1", soak=5),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert "request_id" in details

        _do(client, "Start", first.rollout_id)
        wait_for(lambda: _get(client, first.rollout_id).exposed > 0, what="stage 1 exposure")
        stale = _get(client, first.rollout_id).etag
        paused = _do(client, "Pause", first.rollout_id)
        assert paused.state == rollout_pb2.ROLLOUT_STATE_PAUSED
        assert "etag" in _refused(
            lambda: _do(client, "Resume", first.rollout_id, etag=stale), grpc.StatusCode.ABORTED
        )
        _refused(
            lambda: _do(client, "Promote", first.rollout_id), grpc.StatusCode.FAILED_PRECONDITION
        )
        exposed_while_paused = _get(client, first.rollout_id).exposed
        _do(client, "Resume", first.rollout_id)
        # The stage soaks for an hour: only a promotion moves it on.
        wait_for(
            lambda: (
                report_states(report(client, first.rollout_id)).get("ACTIVE", 0)
                == exposed_while_paused
            ),
            what="stage 1 devices active",
        )
        assert _get(client, first.rollout_id).current_stage == 0
        _do(client, "Promote", first.rollout_id)
        wait_for(
            lambda: _get(client, first.rollout_id).state == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="completion after promotion",
        )
        assert dict(fleet.outcomes(first.rollout_id)) == {"ACTIVE": 30}

        history = client.rollouts.ListRolloutEvents(
            rollout_pb2.ListRolloutEventsRequest(rollout_id=first.rollout_id),
            metadata=client.metadata,
        ).events
        actions = [e.action for e in history if e.action != "expose"]
        assert actions == [
            "create",
            "start",
            "advance",
            "pause",
            "resume",
            "promote",
            "advance",
            "complete",
        ]
        assert {e.actor for e in history} == {"admin", "engine"}
    finally:
        client.close()
        fleet.stop()


def test_abort_keeps_installs_and_a_second_rollout_of_the_feature_is_refused(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 30)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        publish(client, stack, tmp_path, "1.1.0", size=9_000)
        first = _create(client, "1.0.0")
        _do(client, "Start", first.rollout_id)
        wait_for(
            lambda: (
                report_states(report(client, first.rollout_id)).get("ACTIVE", 0)
                == _get(client, first.rollout_id).exposed
                > 0
            ),
            what="stage 1 active",
        )

        second = _create(client, "1.1.0", selector='region = "eu"')
        details = _refused(
            lambda: _do(client, "Start", second.rollout_id), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert first.rollout_id in details

        aborted = _do(client, "Abort", first.rollout_id)
        assert aborted.state == rollout_pb2.ROLLOUT_STATE_ABORTED
        installed = aborted.exposed
        # Aborting stops new exposures; devices that installed keep the bundle.
        assert sum(1 for d in fleet.devices if "lane-assist" in d.installed) == installed
        assert _do(client, "Start", second.rollout_id).state == rollout_pb2.ROLLOUT_STATE_RUNNING
        _refused(
            lambda: _do(client, "Resume", first.rollout_id), grpc.StatusCode.FAILED_PRECONDITION
        )
    finally:
        client.close()
        fleet.stop()


def test_operator_rollback_returns_exposed_devices_to_their_last_known_good(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 24)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        good = publish(client, stack, tmp_path, "1.0.0")
        base = _create(client, "1.0.0", soak=0)
        _do(client, "Start", base.rollout_id)
        wait_for(
            lambda: _get(client, base.rollout_id).state == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="1.0.0 everywhere",
        )
        publish(client, stack, tmp_path, "2.0.0", size=11_000)
        candidate = _create(client, "2.0.0")
        _do(client, "Start", candidate.rollout_id)
        wait_for(
            lambda: (
                report_states(report(client, candidate.rollout_id)).get("ACTIVE", 0)
                == _get(client, candidate.rollout_id).exposed
                > 0
            ),
            what="2.0.0 on stage 1",
        )
        exposed = _do(client, "Rollback", candidate.rollout_id).exposed
        wait_for(
            lambda: report_states(report(client, candidate.rollout_id)) == {"ROLLED_BACK": exposed},
            what="exposed devices reverted",
        )
        assert all(d.installed["lane-assist"].sha256.hex() == good for d in fleet.devices)
    finally:
        client.close()
        fleet.stop()
