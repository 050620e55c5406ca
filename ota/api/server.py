"""The gRPC server: the five services, health, reflection, on a real port."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ota.api.audit import AuditServicer
from ota.api.auth import Authenticator
from ota.api.bundles import BundleServicer
from ota.api.fleet import FleetServicer
from ota.api.health import ServiceHealth
from ota.api.interceptor import OtaInterceptor
from ota.api.reports import ReportServicer
from ota.api.rollouts import RolloutServicer
from ota.api.tokens import TokenServicer
from ota.api.webhooks import WebhookServicer
from ota.errors import Unavailable
from ota.metrics import Metrics
from ota.tls import ServerTls
from ota.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    bundle_pb2,
    bundle_pb2_grpc,
    fleet_pb2,
    fleet_pb2_grpc,
    report_pb2,
    report_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    token_pb2,
    token_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def build_server(
    listen: str,
    *,
    auth: Authenticator,
    bundles: BundleServicer,
    rollouts: RolloutServicer,
    fleet: FleetServicer,
    reports: ReportServicer,
    tokens: TokenServicer,
    webhooks: WebhookServicer | None = None,
    audit: AuditServicer | None = None,
    workers: int = 32,
    tls: ServerTls | None = None,
    metrics: Metrics | None = None,
    device_listen: str = "",
    device_tls: ServerTls | None = None,
) -> tuple[grpc.Server, int, ServiceHealth]:
    """Build and bind (not start) the server; returns it with the bound port and its health.

    Health starts NOT_SERVING: the control plane's health monitor says SERVING
    once the broker link is up and the database answers.

    With `device_listen`, a second port requires a client certificate of the
    device CA (`device_tls.client_ca_file`); `device_port` on the server says
    which port it got.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ota-rpc"),
        interceptors=[OtaInterceptor(auth, metrics)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC shares a port with any other process by default (SO_REUSEPORT): a
            # second `ota serve` on the same address would start, take half the calls
            # and the first one's broker session. One listener per address.
            ("grpc.so_reuseport", 0),
        ],
    )
    bundle_pb2_grpc.add_BundleServiceServicer_to_server(bundles, server)
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(rollouts, server)
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(fleet, server)
    report_pb2_grpc.add_ReportServiceServicer_to_server(reports, server)
    token_pb2_grpc.add_TokenServiceServicer_to_server(tokens, server)
    if webhooks is not None:
        webhook_pb2_grpc.add_WebhookServiceServicer_to_server(webhooks, server)
    if audit is not None:
        audit_pb2_grpc.add_AuditServiceServicer_to_server(audit, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        bundle_pb2.DESCRIPTOR.services_by_name["BundleService"].full_name,
        rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name,
        fleet_pb2.DESCRIPTOR.services_by_name["FleetService"].full_name,
        report_pb2.DESCRIPTOR.services_by_name["ReportService"].full_name,
        token_pb2.DESCRIPTOR.services_by_name["TokenService"].full_name,
    ]
    if webhooks is not None:
        names.append(webhook_pb2.DESCRIPTOR.services_by_name["WebhookService"].full_name)
    if audit is not None:
        names.append(audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        if tls is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, tls.credentials())
    except RuntimeError as exc:
        # gRPC's own text ("Failed to bind ...; set GRPC_VERBOSITY ...") says less than this.
        raise Unavailable(
            f"cannot listen on {listen}: the address is in use (another `ota serve`?) or not "
            "this machine's",
            field="listen",
        ) from exc
    if port == 0:
        raise Unavailable(
            f"cannot listen on {listen}: the address is in use or not this machine's",
            field="listen",
        )
    if device_listen:
        assert device_tls is not None and device_tls.client_ca_file is not None
        try:
            device_port = server.add_secure_port(device_listen, device_tls.credentials())
        except RuntimeError as exc:
            raise Unavailable(
                f"cannot listen on {device_listen}: the address is in use (another `ota "
                "serve`?) or not this machine's",
                field="device_listen",
            ) from exc
        if device_port == 0:
            raise Unavailable(
                f"cannot listen on {device_listen}: the address is in use or not this machine's",
                field="device_listen",
            )
        server.device_port = device_port  # type: ignore[attr-defined]
    answers = ServiceHealth(health_servicer, names)
    answers.set(serving=False)
    return server, port, answers
