"""Deleting a DRAFT rollout: gone for every reader but its audit log, its request_id kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import report_pb2, rollout_pb2, token_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture
def stack_on(tmp_path: Path, broker: BrokerHandle, database_url: str) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), database_url=database_url)
    try:
        yield dev
    finally:
        dev.stop()


def _ota(stack: DevStack, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ota"), *args],
        env={**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = error.value.code()  # type: ignore[attr-defined]
    return code


def test_a_draft_is_deleted_audited_and_a_started_rollout_is_not(
    stack_on: DevStack, tmp_path: Path
) -> None:
    stack = stack_on
    admin = Client.connect(stack.server, stack.admin_token)
    meta = admin.metadata
    bundle = tmp_path / "nav.bin"
    bundle.write_bytes(b"n" * 2000)
    admin.publish_bundle(
        bundle,
        feature="nav",
        version="1.0.0",
        models=["ev6"],
        min_firmware="",
        keys=[stack.keys.release_key],
    )
    release = admin.tokens.CreateToken(
        token_pb2.CreateTokenRequest(token=token_pb2.Token(display_name="rel-eng", role="release")),
        metadata=meta,
    ).secret
    request = rollout_pb2.CreateRolloutRequest(
        feature="nav",
        version="1.0.0",
        stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
        request_id="nav-2026-12",
    )
    draft = admin.rollouts.CreateRollout(request, metadata=meta)
    assert draft.state == rollout_pb2.ROLLOUT_STATE_DRAFT

    deleted = _ota(stack, release, "rollout", "delete", draft.rollout_id, "--reason", "wrong soak")
    assert deleted.returncode == 0, deleted.stderr
    assert f"deleted rollout {draft.rollout_id}" in deleted.stdout

    # Gone for every reader but the audit log.
    get = admin.rollouts.GetRollout
    assert (
        _code(
            lambda: get(rollout_pb2.GetRolloutRequest(rollout_id=draft.rollout_id), metadata=meta)
        )
        == grpc.StatusCode.NOT_FOUND
    )
    listed = admin.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), metadata=meta)
    assert draft.rollout_id not in [r.rollout_id for r in listed.rollouts]
    with_deleted = admin.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(show_deleted=True), metadata=meta
    )
    assert [(r.rollout_id, r.state) for r in with_deleted.rollouts] == [
        (draft.rollout_id, rollout_pb2.ROLLOUT_STATE_DELETED)
    ]
    feature = admin.reports.GetFeatureReport(
        report_pb2.GetFeatureReportRequest(feature="nav"), metadata=meta
    )
    assert draft.rollout_id not in str(feature)

    events = admin.rollouts.ListRolloutEvents(
        rollout_pb2.ListRolloutEventsRequest(rollout_id=draft.rollout_id), metadata=meta
    ).events
    assert [e.action for e in events] == ["create", "delete"]
    last = events[-1]
    assert (last.actor, last.reason) == ("rel-eng", "wrong soak")
    assert (last.from_state, last.to_state) == (
        rollout_pb2.ROLLOUT_STATE_DRAFT,
        rollout_pb2.ROLLOUT_STATE_DELETED,
    )
    assert last.time.seconds >= events[0].time.seconds > 0
    history = _ota(
        stack, stack.admin_token, "rollout", "history", draft.rollout_id, "--format", "json"
    )
    assert history.returncode == 0, history.stderr
    assert [e["action"] for e in json.loads(history.stdout)["events"]] == ["create", "delete"]
    audit = _ota(
        stack,
        stack.admin_token,
        "audit",
        "--object",
        f"rollout/{draft.rollout_id}",
        "--format",
        "json",
    )
    assert audit.returncode == 0, audit.stderr
    newest = json.loads(audit.stdout)["entries"][0]
    assert (newest["action"], newest["actor"], newest["reason"]) == (
        "delete",
        "rel-eng",
        "wrong soak",
    )

    # A retry of the create does not bring it back; the line says why.
    assert (
        _code(lambda: admin.rollouts.CreateRollout(request, metadata=meta))
        == grpc.StatusCode.ALREADY_EXISTS
    )
    again = _ota(stack, release, "rollout", "delete", draft.rollout_id)
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr and "was deleted" in again.stderr
    unknown = _ota(stack, release, "rollout", "delete", "r-00000000")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr

    # A new request id makes a new rollout; once started it cannot be deleted.
    running = admin.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="nav",
            version="1.0.0",
            stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            request_id="nav-2026-12b",
        ),
        metadata=meta,
    )
    admin.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=running.rollout_id), metadata=meta
    )
    refused = _ota(stack, release, "rollout", "delete", running.rollout_id, "--reason", "oops")
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION" in refused.stderr and "only a DRAFT" in refused.stderr
    after = get(rollout_pb2.GetRolloutRequest(rollout_id=running.rollout_id), metadata=meta)
    assert after.state == rollout_pb2.ROLLOUT_STATE_RUNNING
    actions = admin.rollouts.ListRolloutEvents(
        rollout_pb2.ListRolloutEventsRequest(rollout_id=running.rollout_id), metadata=meta
    ).events
    assert "delete" not in [e.action for e in actions]
    admin.close()
