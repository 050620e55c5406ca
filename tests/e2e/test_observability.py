"""Prometheus metrics over HTTP after real RPCs and real device events; JSON logs."""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ota.client import Client
from ota.config import ServerConfig
from ota.devstack import DevStack
from ota.domain.states import ALL_STATES
from ota.errors import InvalidArgument
from ota.logs import JsonFormatter
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.e2e.scenario import MODELS, publish, wait_for

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: DevStack) -> Samples:
    assert stack.metrics_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(stack.metrics_url, timeout=20) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_move_with_rpcs_ingest_and_rollouts(
    stack: DevStack, broker: BrokerHandle, tmp_path: Path
) -> None:
    before = scrape(stack)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        secrets = {
            c.device_id: c.secret
            for c in client.fleet.RegisterDevices(
                fleet_pb2.RegisterDevicesRequest(
                    devices=[
                        fleet_pb2.DeviceRegistration(
                            device_id=d, model=MODELS[0], region="eu", firmware="4.2.0"
                        )
                        for d in ("car-1", "car-2")
                    ]
                ),
                metadata=client.metadata,
            ).credentials
        }
        client.rollouts.ListRollouts(rollout_pb2.ListRolloutsRequest(), metadata=client.metadata)
        # The end of every device's TUF refresh: root N+1 does not exist (yet).
        with pytest.raises(grpc.RpcError) as missing:
            client.bundles.GetMetadata(
                bundle_pb2.GetMetadataRequest(role="root", version=2), metadata=client.metadata
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError):
            client.rollouts.GetRollout(
                rollout_pb2.GetRolloutRequest(rollout_id="nope"), metadata=client.metadata
            )
        publish(client, stack, tmp_path, "1.0.0")
        created = client.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="lane-assist",
                version="1.0.0",
                # One stage over everyone, soaking for an hour: it stays RUNNING.
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=3600)],
            ),
            metadata=client.metadata,
        )
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
            metadata=client.metadata,
        )
    finally:
        client.close()
    rollout_id = created.rollout_id
    # A device reports on a rollout once it is exposed to it: wait for the exposure
    # (read from /metrics, so no RPC counted below is added).
    wait_for(
        lambda: value(scrape(stack), "ota_rollout_exposed_devices", rollout_id=rollout_id) == 2,
        what="the rollout's exposure of both devices",
    )

    topic = "ota/v1/devices/car-1/events"
    event = common_pb2.DeviceEvent(
        device_id="car-1",
        seq=1,
        state=common_pb2.NOTIFIED,
        rollout_id=rollout_id,
        feature="lane-assist",
        version="1.0.0",
    )
    with broker.client("car-1", secrets["car-1"]) as car:
        car.connect_ok()
        assert not car.publish(topic, b"\xff\x00 not a protobuf").is_failure
        assert not car.publish(topic, event.SerializeToString()).is_failure

    def settled() -> bool:
        now = scrape(stack)
        return (
            value(now, "ota_ingest_events_stored_total")
            >= value(before, "ota_ingest_events_stored_total") + 1
            and value(now, "ota_ingest_dropped_total", reason="malformed")
            >= value(before, "ota_ingest_dropped_total", reason="malformed") + 1
            and value(now, "ota_rollout_exposed_devices", rollout_id=rollout_id) == 2
        )

    wait_for(settled, what="the ingested event, the drop and the exposure in /metrics")
    after = scrape(stack)
    ok = {"method": "RolloutService/ListRollouts", "code": "OK"}
    assert (
        value(after, "ota_rpc_requests_total", **ok)
        == value(before, "ota_rpc_requests_total", **ok) + 1
    )
    assert (
        value(after, "ota_rpc_requests_total", method="RolloutService/GetRollout", code="NOT_FOUND")
        == value(
            before, "ota_rpc_requests_total", method="RolloutService/GetRollout", code="NOT_FOUND"
        )
        + 1
    )
    assert value(after, "ota_rpc_duration_seconds_count", method="RolloutService/ListRollouts") >= 1
    assert (
        value(
            after,
            "ota_rollout_stage",
            rollout_id=rollout_id,
            feature="lane-assist",
            version="1.0.0",
            state="RUNNING",
        )
        == 1  # numbered as the CLI shows it: stage 1/1
    )
    # Every state of a running rollout has a series, from 0; they add up to the exposure.
    states = {
        dict(labels)["state"]: v
        for (name, labels), v in after.items()
        if name == "ota_rollout_devices" and dict(labels)["rollout_id"] == rollout_id
    }
    assert set(ALL_STATES) <= set(states)
    assert (states["TARGETED"], states["NOTIFIED"], states["FAILED"]) == (1, 1, 0)
    assert sum(states.values()) == 2
    # A normal refresh's NOT_FOUND is counted apart: `code!="OK"` stays quiet.
    metadata = "BundleService/GetMetadata"
    assert value(after, "ota_metadata_not_found_total") == (
        value(before, "ota_metadata_not_found_total") + 1
    )
    assert value(after, "ota_rpc_requests_total", method=metadata, code="NOT_FOUND") == 0
    assert value(after, "ota_devices", online="false") == 2
    assert value(after, "ota_engine_lease_held", replica=stack.control_plane.lease.holder) == 1
    assert value(after, "ota_broker_connected") == 1
    assert value(after, "ota_serving") == 1
    assert any(name == "ota_build_info" for name, _ in after)
    assert value(after, "ota_gate_evaluations_total", metric="install_failure", result="ok") > 0
    for series in (
        ("ota_gate_trips_total", {"metric": "install_failure", "action": "rollback"}),
        ("ota_rollout_rollbacks_total", {"trigger": "operator"}),
        ("ota_rollout_kills_total", {}),
    ):
        assert (series[0], frozenset(series[1].items())) in after  # there from the start
    assert value(after, "ota_rollout_eligible_devices", rollout_id=rollout_id) == 2
    assert ("ota_publish_backlog", frozenset()) in after
    assert ("ota_ingest_backlog_messages", frozenset()) in after
    assert value(after, "ota_ingest_lag_seconds") >= 0
    # Only the control plane's own services are timed, not health or reflection.
    assert not any("Health" in dict(labels).get("method", "") for _, labels in after)


CONTRIB = Path(__file__).resolve().parents[2] / "contrib"


def _queried_names(text: str) -> set[str]:
    return set(re.findall(r"\bota_[a-z_]+\b", text))


def test_every_metric_the_dashboard_and_alerts_query_exists(stack: DevStack) -> None:
    assert stack.metrics_url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(stack.metrics_url, timeout=20) as response:
        text = response.read().decode()
    served = set()
    for family in text_string_to_metric_families(text):
        # A labelled family with no child yet has no samples: name its series by type.
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
        served.update(family.name + x for x in suffixes.get(family.type, [""]))
        served.update(s.name for s in family.samples)
    dashboard = json.loads((CONTRIB / "grafana" / "ota.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    dashboard_names = _queried_names("\n".join(exprs))
    alert_names = _queried_names((CONTRIB / "prometheus" / "alerts.yml").read_text()) - {
        "ota_ingest_backlog_messages"  # named in an annotation's advice, queried by the dashboard
    }
    assert not dashboard_names - served, sorted(dashboard_names - served)
    assert not alert_names - served, sorted(alert_names - served)
    assert {"ota_rollout_stage", "ota_engine_lease_held", "ota_webhook_deliveries"} <= (
        dashboard_names
    )


def test_json_logs_carry_rollout_and_device_ids() -> None:
    record = logging.LogRecord(
        "ota.rollout.engine", logging.WARNING, "x", 1, "rollout %s: %s", ("r-1", "gate"), None
    )
    record.rollout_id = "r-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "rollout r-1: gate"
    assert line["rollout_id"] == "r-1" and line["level"] == "WARNING"
    assert "device_id" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        failing = logging.LogRecord("ota.x", logging.ERROR, "x", 1, "failed", (), sys.exc_info())
    failing.device_id = "car-7"
    line = json.loads(JsonFormatter().format(failing))
    assert line["device_id"] == "car-7" and "ValueError: boom" in line["exception"]


def test_config_refuses_bad_log_format_metrics_address_and_half_a_tls_setup() -> None:
    with pytest.raises(InvalidArgument, match="log_format"):
        ServerConfig(log_format="xml")
    with pytest.raises(InvalidArgument, match="tls_cert_file"):
        ServerConfig(tls_cert_file="/etc/ota/server.pem")
    with pytest.raises(InvalidArgument, match="tls_client_ca_file"):
        ServerConfig(tls_client_ca_file="/etc/ota/ca.pem")
    with pytest.raises(InvalidArgument, match="metrics_listen"):
        ServerConfig(metrics_listen="9464")
    assert ServerConfig(metrics_listen="[::1]:9464").metrics_listen == "[::1]:9464"
