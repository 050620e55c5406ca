"""Prometheus metrics of one control plane, served over HTTP at /metrics.

Counters kept in process (RPCs, ingested and dropped messages) are per
replica, as Prometheus expects: sum them across replicas in queries. Rollout
progress and the publish backlog are read from the database at scrape time,
so every replica reports the same fleet-wide numbers; they come from the
maintained aggregates (adoption_stat, rollout.eligible), so a scrape costs a
few indexed reads, not a scan of the fleet.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select

from ota import __version__
from ota.domain.plan import GATE_ACTIONS, METRICS
from ota.domain.states import ALL_STATES, ROLLOUT_ACTIVE
from ota.domain.webhooks import DELIVERY_STATES
from ota.errors import InvalidArgument, Unavailable
from ota.store.models import (
    AdoptionStatRow,
    DesiredStateRow,
    DeviceRow,
    RolloutRow,
    WebhookDeliveryRow,
)
from ota.store.session import Store

log = logging.getLogger(__name__)

# RPCs range from sub-millisecond reads to multi-second uploads and streams.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A TUF client ends every refresh by asking for root N+1 and other versions not
# published yet: NOT_FOUND there is the normal answer, not an error.
METADATA_METHOD = "BundleService/GetMetadata"
# Gate actions that stop a rollout (a "hold" gate only keeps it at its stage).
TRIP_ACTIONS = tuple(a for a in GATE_ACTIONS if a != "hold")


class IngestStats(Protocol):
    """What ingest exposes (ota.transport.ingest_workers.IngestWorkers): totals over
    the in-process ingester and every worker process."""

    @property
    def stored(self) -> int: ...

    @property
    def lag_seconds(self) -> float: ...

    @property
    def dropped(self) -> Mapping[str, int]: ...

    @property
    def restarts(self) -> int: ...

    def backlog(self) -> int: ...

    def alive(self) -> int: ...


class Metrics:
    """The registry of one control plane and the metrics it updates as it runs."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpc_requests = Counter(
            "ota_rpc_requests",
            "RPCs handled, by method and final status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "ota_rpc_duration_seconds",
            "Time to handle an RPC (a stream: its whole life), by method",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.metadata_not_found = Counter(
            "ota_metadata_not_found",
            "GetMetadata calls for a version not published yet: the normal end of a device's "
            "TUF refresh (not counted in ota_rpc_requests_total)",
            registry=self.registry,
        )
        self.gate_evaluations = Counter(
            "ota_gate_evaluations",
            "Gate readings by the engine, by gate metric and result (ok or breached)",
            ["metric", "result"],
            registry=self.registry,
        )
        self.gate_trips = Counter(
            "ota_gate_trips",
            "Gates that stopped a rollout, by gate metric and action (pause or rollback)",
            ["metric", "action"],
            registry=self.registry,
        )
        self.rollbacks = Counter(
            "ota_rollout_rollbacks",
            "Rollouts rolled back, by trigger (gate or operator)",
            ["trigger"],
            registry=self.registry,
        )
        self.kills = Counter(
            "ota_rollout_kills", "Rollouts killed (the kill switch)", registry=self.registry
        )
        # Every series exists from the start at 0, so queries need no `or vector(0)`.
        for metric in METRICS:
            for result in ("ok", "breached"):
                self.gate_evaluations.labels(metric, result)
            for action in TRIP_ACTIONS:
                self.gate_trips.labels(metric, action)
        for trigger in ("gate", "operator"):
            self.rollbacks.labels(trigger)

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        name = method.rsplit("/", 2)
        short = f"{name[-2].rsplit('.', 1)[-1]}/{name[-1]}" if len(name) == 3 else method
        if short == METADATA_METHOD and code == grpc.StatusCode.NOT_FOUND:
            self.metadata_not_found.inc()
        else:
            self.rpc_requests.labels(short, code.name).inc()
        self.rpc_seconds.labels(short).observe(seconds)

    def gate_read(self, metric: str, *, breached: bool) -> None:
        self.gate_evaluations.labels(metric, "breached" if breached else "ok").inc()

    def gate_tripped(self, metric: str, action: str) -> None:
        self.gate_trips.labels(metric, action).inc()
        if action == "rollback":
            self.rollbacks.labels("gate").inc()

    def rolled_back(self) -> None:
        self.rollbacks.labels("operator").inc()

    def killed(self) -> None:
        self.kills.inc()

    def watch_process(
        self, *, replica: str, holds_lease: Callable[[], bool], broker_up: Callable[[], bool]
    ) -> None:
        """Report this replica's engine lease, its broker link and what build it runs."""
        self.registry.register(_ProcessCollector(replica, holds_lease, broker_up))

    def watch_health(self, serving: Callable[[], bool]) -> None:
        """What this replica's gRPC health service answers: 1 for SERVING."""
        Gauge(
            "ota_serving",
            "1 while gRPC health answers SERVING (broker link up, database answering)",
            registry=self.registry,
        ).set_function(lambda: 1 if serving() else 0)

    def watch(self, store: Store, ingest: IngestStats) -> None:
        """Report the fleet's rollouts and backlogs from `store`, and `ingest`'s counters."""
        self.registry.register(_FleetCollector(store, ingest))

    def watch_dashboard(
        self,
        sessions: Callable[[], int],
        watched: Callable[[], int],
        renders: Callable[[], int],
    ) -> None:
        """The dashboard's signed-in sessions, followed rollouts and live renderings."""
        readings: tuple[tuple[str, str, Callable[[], int]], ...] = (
            ("ota_dashboard_sessions", "Dashboard sessions signed in on this replica", sessions),
            ("ota_dashboard_live_rollouts", "Rollouts some browser follows live", watched),
            ("ota_dashboard_live_renders", "Live reports rendered (once per change)", renders),
        )
        for name, doc, read in readings:
            Gauge(name, doc, registry=self.registry).set_function(read)

    def serve(self, listen: str) -> MetricsServer:
        host, port = parse_listen(listen)
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise Unavailable(f"cannot serve metrics on {listen}: {exc.strerror}") from exc
        return MetricsServer(server, thread)


@dataclass
class MetricsServer:
    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parse_listen(listen: str, *, field: str = "metrics_listen") -> tuple[str, int]:
    """host:port (port 0..65535; 0 = any free port), the host optionally in brackets."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        example = "0.0.0.0:50051" if field == "listen" else "127.0.0.1:9464"
        raise InvalidArgument(
            f"{listen!r} is not host:port with a port from 0 to 65535, e.g. {example}",
            field=field,
        )
    return host.strip("[]") or "0.0.0.0", int(port)


class _ProcessCollector(Collector):
    def __init__(
        self, replica: str, holds_lease: Callable[[], bool], broker_up: Callable[[], bool]
    ) -> None:
        self._replica = replica
        self._holds_lease = holds_lease
        self._broker_up = broker_up

    def collect(self) -> Iterable[Metric]:
        lease = GaugeMetricFamily(
            "ota_engine_lease_held",
            "1 while this replica holds the engine lease (runs the engine, publishes, "
            "sends webhooks); summed over replicas it should be 1",
            labels=["replica"],
        )
        lease.add_metric([self._replica], 1 if self._holds_lease() else 0)
        yield lease
        yield GaugeMetricFamily(
            "ota_broker_connected",
            "1 while this replica's MQTT link to the broker is up",
            value=1 if self._broker_up() else 0,
        )
        info = GaugeMetricFamily(
            "ota_build_info", "The ota version this replica runs", labels=["version", "python"]
        )
        info.add_metric([__version__, platform.python_version()], 1)
        yield info


class _FleetCollector(Collector):
    def __init__(self, store: Store, ingest: IngestStats) -> None:
        self._store = store
        self._ingest = ingest

    def collect(self) -> Iterable[Metric]:
        yield from self._ingest_metrics()
        try:
            yield from self._database_metrics()
        except Exception as exc:
            # A scrape must not fail because the database is briefly away; the
            # counters above still go out and the gap shows in the graphs.
            log.warning("metrics: cannot read the database: %s", exc)

    def _ingest_metrics(self) -> Iterable[Metric]:
        stored = CounterMetricFamily(
            "ota_ingest_events_stored",
            "Device events stored by this replica's ingest (its worker processes included)",
        )
        stored.add_metric([], self._ingest.stored)
        yield stored
        dropped = CounterMetricFamily(
            "ota_ingest_dropped",
            "Device messages dropped (counted, never stored), by reason",
            labels=["reason"],
        )
        for reason, n in sorted(dict(self._ingest.dropped).items()):
            dropped.add_metric([reason], n)
        yield dropped
        yield GaugeMetricFamily(
            "ota_ingest_backlog_messages",
            "Device messages received from the broker, not yet committed",
            value=self._ingest.backlog(),
        )
        yield GaugeMetricFamily(
            "ota_ingest_workers",
            "Ingest worker processes running (0: ingest runs in the control plane's process)",
            value=self._ingest.alive(),
        )
        restarts = CounterMetricFamily(
            "ota_ingest_worker_restarts",
            "Ingest worker processes that ended unasked and were started again",
        )
        restarts.add_metric([], self._ingest.restarts)
        yield restarts
        yield GaugeMetricFamily(
            "ota_ingest_lag_seconds",
            "Time the oldest message of the last committed batch waited from receipt to commit",
            value=self._ingest.lag_seconds,
        )

    def _database_metrics(self) -> Iterable[Metric]:
        stage = GaugeMetricFamily(
            "ota_rollout_stage",
            "Current stage of each running or paused rollout, numbered as the CLI shows it "
            "(1 = the first stage; 0 before it starts)",
            labels=["rollout_id", "feature", "version", "state"],
        )
        eligible = GaugeMetricFamily(
            "ota_rollout_eligible_devices",
            "Devices the rollout's selector and bundle admit (as of the engine's last count)",
            labels=["rollout_id"],
        )
        exposed = GaugeMetricFamily(
            "ota_rollout_exposed_devices",
            "Devices the rollout has exposed so far",
            labels=["rollout_id"],
        )
        devices = GaugeMetricFamily(
            "ota_rollout_devices",
            "Exposed devices by state (TARGETED: exposed, nothing reported yet); every state "
            "of every running or paused rollout, from 0",
            labels=["rollout_id", "state"],
        )
        fleet = GaugeMetricFamily(
            "ota_devices",
            "Registered devices, not revoked, by whether the broker sees them online",
            labels=["online"],
        )
        with self._store.transaction() as session:
            active = list(
                session.exec(select(RolloutRow).where(col(RolloutRow.state).in_(ROLLOUT_ACTIVE)))
            )
            ids = [r.rollout_id for r in active]
            sums = session.exec(
                select(
                    AdoptionStatRow.rollout_id,
                    AdoptionStatRow.metric,
                    AdoptionStatRow.key,
                    func.sum(AdoptionStatRow.value),
                )
                .where(col(AdoptionStatRow.rollout_id).in_(ids))
                .where(col(AdoptionStatRow.metric).in_(("exposed", "state")))
                .group_by(
                    col(AdoptionStatRow.rollout_id),
                    col(AdoptionStatRow.metric),
                    col(AdoptionStatRow.key),
                )
            ).all()
            backlog = session.exec(
                select(func.count()).where(
                    col(DesiredStateRow.published_generation) < col(DesiredStateRow.generation)
                )
            ).one()
            deliveries = dict(
                session.exec(
                    select(WebhookDeliveryRow.state, func.count()).group_by(
                        col(WebhookDeliveryRow.state)
                    )
                ).all()
            )
            online = dict(
                session.exec(
                    select(DeviceRow.online, func.count())
                    .where(col(DeviceRow.revoked).is_(False))
                    .group_by(col(DeviceRow.online))
                ).all()
            )
        exposed_by: dict[str, int] = {}
        by_state: dict[str, dict[str, int]] = {r.rollout_id: {} for r in active}
        for rollout_id, metric, key, total in sums:
            if metric == "exposed":
                exposed_by[rollout_id] = exposed_by.get(rollout_id, 0) + int(total or 0)
            else:
                states = by_state.setdefault(rollout_id, {})
                states[key] = states.get(key, 0) + int(total or 0)
        for r in active:
            stage.add_metric(
                [r.rollout_id, r.feature, r.version, r.state],
                r.current_stage + 1 if r.current_stage >= 0 else 0,
            )
            if r.eligible is not None:
                eligible.add_metric([r.rollout_id], r.eligible)
            n_exposed = exposed_by.get(r.rollout_id, 0)
            exposed.add_metric([r.rollout_id], n_exposed)
            states = by_state.get(r.rollout_id, {})
            # The aggregates count devices that reported; the rest are still TARGETED.
            reported = sum(n for state, n in states.items() if state != "TARGETED")
            states["TARGETED"] = max(0, n_exposed - reported)
            for state in dict.fromkeys([*ALL_STATES, *states]):
                devices.add_metric([r.rollout_id, state], states.get(state, 0))
        for is_online in (True, False):
            fleet.add_metric(["true" if is_online else "false"], int(online.get(is_online, 0)))
        webhook = GaugeMetricFamily(
            "ota_webhook_deliveries",
            "Webhook deliveries by state: pending (queued or retrying), delivered, dead "
            "(gave up; `ota webhooks redeliver`)",
            labels=["state"],
        )
        for state in DELIVERY_STATES:
            webhook.add_metric([state], int(deliveries.get(state, 0)))
        yield webhook
        yield stage
        yield eligible
        yield exposed
        yield devices
        yield fleet
        yield GaugeMetricFamily(
            "ota_publish_backlog",
            "Signed desired states not yet acknowledged by the broker",
            value=int(backlog),
        )
