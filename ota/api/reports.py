"""ReportService: the adoption report product managers read."""

from __future__ import annotations

import grpc

from ota.api import convert
from ota.clock import Clock
from ota.errors import InvalidArgument
from ota.reports.model import build_feature_report, build_report
from ota.store.session import Store
from ota.v1 import report_pb2, report_pb2_grpc


class ReportServicer(report_pb2_grpc.ReportServiceServicer):
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def GetRolloutReport(
        self, request: report_pb2.GetRolloutReportRequest, context: grpc.ServicerContext
    ) -> report_pb2.RolloutReport:
        if not request.rollout_id:
            raise InvalidArgument("is required", field="rollout_id")
        with self._store.transaction() as session:
            report = build_report(session, request.rollout_id, self._clock.now())
        return convert.report(report, report.current_states)

    def GetFeatureReport(
        self, request: report_pb2.GetFeatureReportRequest, context: grpc.ServicerContext
    ) -> report_pb2.FeatureReport:
        if not request.feature:
            raise InvalidArgument("is required", field="feature")
        with self._store.transaction() as session:
            report = build_feature_report(session, request.feature, self._clock.now())
        return convert.feature_report(report)
