"""Whole-system rollouts: real broker, control plane on a real port, SQLite, simulated devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from ota.client import Client
from ota.devstack import DevStack
from ota.domain.bucketing import is_exposed
from ota.v1 import rollout_pb2
from tests.e2e.scenario import publish, report, report_states, run_rollout, start_fleet, wait_for

pytestmark = pytest.mark.e2e


def test_staged_rollout_completes_and_the_report_counts_what_devices_did(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 90)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        sha = publish(client, stack, tmp_path, "1.0.0")
        final = run_rollout(client, "1.0.0", [100_000, 500_000, 1_000_000])
        assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason

        # Stage exposure is exactly what ota-bucket-v1 says, recomputed here from the salt.
        salt = bytes.fromhex(final.salt_hex)
        ids = [d.device_id for d in fleet.devices]
        first = sum(is_exposed(salt, i, 100_000) for i in ids)
        second = sum(is_exposed(salt, i, 500_000) for i in ids) - first
        assert [p.exposed for p in final.progress] == [first, second, len(ids) - first - second]
        # Each stage's start, from the audit log, in order; the last is the current stage's.
        started = [p.started_time.ToDatetime() for p in final.progress]
        assert all(p.HasField("started_time") for p in final.progress)
        assert started == sorted(started)
        assert final.progress[-1].started_time == final.stage_started_time

        r = report(client, final.rollout_id)
        assert report_states(r) == {"ACTIVE": 90} == dict(fleet.outcomes(final.rollout_id))
        # Every step to ACTIVE; the last, USED, is 0: these devices report no use.
        assert [(s.step, s.devices) for s in r.funnel][-1] == ("USED", 0)
        assert [s.devices for s in r.funnel] == [90] * 6 + [0]
        assert list(r.rollout.progress) == list(final.progress)
        assert all(d.installed["lane-assist"].sha256.hex() == sha for d in fleet.devices)
        assert r.events_ingested == sum(d.record.events_sent for d in fleet.devices)
    finally:
        client.close()
        fleet.stop()


def test_failing_model_trips_the_gate_and_the_rollout_rolls_back(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = start_fleet(stack, tmp_path, 60, failures=["ev9@2.0.0=1.0"])
    client = Client.connect(stack.server, stack.admin_token)
    try:
        good = publish(client, stack, tmp_path, "1.0.0")
        assert (
            run_rollout(client, "1.0.0", [1_000_000]).state == rollout_pb2.ROLLOUT_STATE_COMPLETED
        )
        publish(client, stack, tmp_path, "2.0.0", size=12_000)
        final = run_rollout(
            client, "2.0.0", [500_000, 1_000_000], action=rollout_pb2.GATE_ACTION_ROLLBACK
        )
        assert final.state == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK
        assert "install-failure gate tripped" in final.state_reason

        exposed = final.exposed
        wait_for(
            lambda: report_states(report(client, final.rollout_id)) == {"ROLLED_BACK": exposed},
            what="every exposed device to report ROLLED_BACK",
        )
        r = report(client, final.rollout_id)
        failed = {c.key: c.count for c in r.failures_by_reason}
        device_failures = fleet.failure_reasons(final.rollout_id)
        assert failed == dict(device_failures)
        assert failed["INSTALL_FAILED"] >= 2
        failed_models = {
            d.profile.model for d in fleet.devices if final.rollout_id in d.record.failed_reason
        }
        assert failed_models == {"ev9"}
        # Every device runs 1.0.0 again, the reverted ones without a new download.
        assert all(d.installed["lane-assist"].sha256.hex() == good for d in fleet.devices)
    finally:
        client.close()
        fleet.stop()
