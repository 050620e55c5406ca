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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlmodel import col, select

from ota.domain.states import ROLLOUT_ACTIVE
from ota.errors import InvalidArgument, Unavailable
from ota.store.models import AdoptionStatRow, DesiredStateRow, RolloutRow
from ota.store.session import Store

log = logging.getLogger(__name__)

# RPCs range from sub-millisecond reads to multi-second uploads and streams.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class IngestStats(Protocol):
    """What the ingester exposes about itself (ota.transport.ingester.Ingester)."""

    stored: int
    lag_seconds: float

    @property
    def dropped(self) -> Mapping[str, int]: ...

    def backlog(self) -> int: ...


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

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        name = method.rsplit("/", 2)
        short = f"{name[-2].rsplit('.', 1)[-1]}/{name[-1]}" if len(name) == 3 else method
        self.rpc_requests.labels(short, code.name).inc()
        self.rpc_seconds.labels(short).observe(seconds)

    def watch(self, store: Store, ingest: IngestStats) -> None:
        """Report the fleet's rollouts and backlogs from `store`, and `ingest`'s counters."""
        self.registry.register(_FleetCollector(store, ingest))

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


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(
            f"{listen!r} is not host:port, e.g. 127.0.0.1:9464", field="metrics_listen"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


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
            "ota_ingest_events_stored", "Device events stored by this replica's ingester"
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
            "ota_ingest_lag_seconds",
            "Time the oldest message of the last committed batch waited from receipt to commit",
            value=self._ingest.lag_seconds,
        )

    def _database_metrics(self) -> Iterable[Metric]:
        stage = GaugeMetricFamily(
            "ota_rollout_stage",
            "Current stage index of each running or paused rollout",
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
            "Exposed devices by the state they last reported",
            labels=["rollout_id", "state"],
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
        exposed_by: dict[str, int] = {}
        for rollout_id, metric, key, total in sums:
            if metric == "exposed":
                exposed_by[rollout_id] = exposed_by.get(rollout_id, 0) + int(total or 0)
            else:
                devices.add_metric([rollout_id, key], int(total or 0))
        for r in active:
            stage.add_metric([r.rollout_id, r.feature, r.version, r.state], r.current_stage)
            if r.eligible is not None:
                eligible.add_metric([r.rollout_id], r.eligible)
            exposed.add_metric([r.rollout_id], exposed_by.get(r.rollout_id, 0))
        yield stage
        yield eligible
        yield exposed
        yield devices
        yield GaugeMetricFamily(
            "ota_publish_backlog",
            "Signed desired states not yet acknowledged by the broker",
            value=int(backlog),
        )
