"""control-api: GetRollout unary RPC/s against the real control plane vs an empty servicer.

The control plane runs in this process (DevStack) with one rollout created.
The baseline is a bare grpcio server in the same process, same thread-pool
size, answering GetRollout with the very message the control plane returned
(no auth, no database). One client loop, in a child process so it does not
share a GIL with the servers, drives both, alternating rounds.
"""

from __future__ import annotations

import statistics
import tempfile
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench.common import (
    MODELS,
    REGIONS,
    Figure,
    Result,
    Target,
    bench_stack,
    create_rollout,
    log,
    publish_bundle,
    ratio,
    run_subprocess_json,
)
from device_sim.fleet import provision
from device_sim.profile import compose_fleet
from ota.broker import free_port
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import rollout_pb2, rollout_pb2_grpc

NAME = "control-api"
THREADS = 4
SERVER_WORKERS = 32  # what ota.api.server.build_server uses


class _EmptyRollouts(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, answer: rollout_pb2.Rollout) -> None:
        self._answer = answer

    def GetRollout(
        self, request: rollout_pb2.GetRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.Rollout:
        return self._answer


def _baseline_server(answer: rollout_pb2.Rollout) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_WORKERS))
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
        _EmptyRollouts(answer),  # type: ignore[abstract]  # only GetRollout is called
        server,
    )
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    server.start()
    return server, port


def _rpc(target: str, token: str, rollout_id: str, seconds: float) -> dict[str, Any]:
    return run_subprocess_json(
        [
            "rpc",
            "--target",
            target,
            "--token",
            token,
            "--rollout-id",
            rollout_id,
            "--threads",
            str(THREADS),
            "--seconds",
            str(seconds),
        ],
        timeout=seconds + 60,
    )


def _with_fleet(stack: DevStack, rollout_id: str, devices: int, seconds: float) -> dict[str, Any]:
    """GetRollout again once devices are registered: its cost grows with the fleet."""
    client = Client.connect(stack.server, stack.admin_token)
    try:
        provision(
            client.channel,
            stack.admin_token,
            compose_fleet(devices, models=MODELS, regions=REGIONS, firmware="4.2.0", prefix="api"),
        )
    finally:
        client.close()
    out = _rpc(stack.server, stack.admin_token, rollout_id, seconds)
    log(f"control plane with {devices} registered devices: {out['rps']:,.0f} RPC/s")
    return {"devices": devices, **out}


def run(quick: bool) -> Result:
    seconds = 2.0 if quick else 5.0
    rounds = 1 if quick else 3
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-api-") as tmp,
        bench_stack(Path(tmp)) as (
            stack,
            _broker,
        ),
    ):
        client = Client.connect(stack.server, stack.admin_token)
        try:
            publish_bundle(
                client, stack, Path(tmp), feature="bench-api", version="1.0.0", size=4096
            )
            created = create_rollout(
                client, feature="bench-api", version="1.0.0", stages_ppm=[10_000, 1_000_000]
            )
            answer = client.rollouts.GetRollout(
                rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
                metadata=client.metadata,
            )
        finally:
            client.close()
        server, port = _baseline_server(answer)
        try:
            real: list[dict[str, Any]] = []
            base: list[dict[str, Any]] = []
            for i in range(rounds):
                for label, target, runs in (
                    ("baseline", f"127.0.0.1:{port}", base),
                    ("control plane", stack.server, real),
                ):
                    out = _rpc(target, stack.admin_token, created.rollout_id, seconds)
                    runs.append(out)
                    log(
                        f"round {i + 1} {label}: {out['rps']:,.0f} RPC/s "
                        f"(p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms, "
                        f"errors {out['errors']})"
                    )
            with_fleet = _with_fleet(stack, created.rollout_id, 200 if quick else 2000, seconds)
        finally:
            server.stop(grace=1).wait()
    real_rps = statistics.median(r["rps"] for r in real)
    base_rps = statistics.median(r["rps"] for r in base)
    r = ratio(real_rps, base_rps)
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(real_rps, "RPC/s", "GetRollout on the control plane"),
        baseline=Figure(base_rps, "RPC/s", "GetRollout on an empty grpcio servicer"),
        ratio=r,
        targets=[Target(">= 0.7 of baseline", r is not None and r >= 0.7)],
        details={
            "client_threads": THREADS,
            "seconds_per_round": seconds,
            "rounds": rounds,
            "server_workers": SERVER_WORKERS,
            "response_bytes": answer.ByteSize(),
            "control_plane_runs": real,
            "baseline_runs": base,
            "errors": sum(x["errors"] for x in real + base),
            "with_registered_fleet": with_fleet,
        },
    )
