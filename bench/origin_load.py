"""origin-load: requests the delivery origin serves per device in a rollout behind a shared cache.

A control plane serves its HTTP delivery origin; a private Varnish (the VCL
`ota repo vcl` prints) sits in front of it, listed in `origin_purge_urls` as a
deployment that purges its cache on root rotations would; a simulated fleet (2 000 devices,
200 with --quick) is configured for HTTP delivery through the cache, and a
one-stage rollout of a 1 MiB bundle (256 KiB with --quick) runs to COMPLETED.

Figure: requests the origin answered during the rollout (its own
`ota_origin_requests_total`), per device. Baseline, same run: requests the
devices made to the cache (Varnish's `MAIN.client_req`), per device, which is
what the origin would serve with no cache (or over gRPC: one call per file).
Target: at most 0.01 origin requests per device.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import urllib3
from prometheus_client.parser import text_string_to_metric_families

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
    wait_until,
)
from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.broker.process import free_port
from ota.client import Client
from ota.delivery.varnish import VarnishProcess
from ota.v1 import rollout_pb2

NAME = "origin-load"
TARGET = 0.01
KIB = 1024


def origin_requests(metrics_url: str) -> dict[str, int]:
    """ota_origin_requests_total by "kind status" (`metadata 404`), scraped from the
    control plane."""
    text = urllib3.request("GET", metrics_url, timeout=30).data.decode()
    counts: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ota_origin_requests_total":
                key = f"{sample.labels['kind']} {sample.labels['status']}"
                counts[key] = counts.get(key, 0) + int(sample.value)
    return counts


def cache_requests(varnish: VarnishProcess) -> int:
    done = subprocess.run(
        ["varnishstat", "-n", str(varnish.work_dir), "-1", "-j", "-f", "MAIN.client_req"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    doc = json.loads(done.stdout)
    counters = doc.get("counters", doc)
    return int(counters["MAIN.client_req"]["value"])


def run(quick: bool, devices: int | None = None) -> Result:
    n = devices or (200 if quick else 2000)
    size = (256 if quick else 1024) * KIB
    # The cache's port is chosen first: the control plane purges it on a root rotation,
    # and so the origin keeps the next root's 404 origin_next_root_max_age there.
    cache_port = free_port()
    overrides: dict[str, object] = {
        "origin_listen": "127.0.0.1:0",
        "origin_purge_urls": f"http://127.0.0.1:{cache_port}",
    }
    with (
        tempfile.TemporaryDirectory(prefix="ota-bench-origin-") as tmp,
        bench_stack(Path(tmp), config_overrides=overrides) as (stack, _),
    ):
        work = Path(tmp)
        origin = stack.control_plane.origin_server
        assert origin is not None
        varnish = VarnishProcess.start(work / "varnish", "127.0.0.1", origin.port, port=cache_port)
        client = Client.connect(stack.server, stack.admin_token)
        fleet = SimulatedFleet(
            compose_fleet(n, models=MODELS, regions=REGIONS, firmware="4.2.0"),
            FleetSettings(
                server=stack.server,
                admin_token=stack.admin_token,
                trusted_root=stack.keys.root_json.read_bytes(),
                state_dir=work / "devices",
                failures=FailureProfile(),
                workers=8,
                delivery="http",
                origin_url=varnish.url,
            ),
        )
        try:
            publish_bundle(client, stack, work, feature="bench-origin", version="1.0.0", size=size)
            log(f"starting {n} devices")
            fleet.start(timeout=max(120.0, n / 20))
            origin_before = origin_requests(stack.metrics_url)
            cache_before = cache_requests(varnish)
            created = create_rollout(
                client, feature="bench-origin", version="1.0.0", stages_ppm=[1_000_000]
            )
            t0 = time.perf_counter()
            client.rollouts.StartRollout(
                rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
                metadata=client.metadata,
            )

            def done() -> bool:
                got = client.rollouts.GetRollout(
                    rollout_pb2.GetRolloutRequest(rollout_id=created.rollout_id),
                    metadata=client.metadata,
                )
                return bool(got.state == rollout_pb2.ROLLOUT_STATE_COMPLETED)

            wait_until(done, what="the rollout to complete", timeout=600, interval=0.2)
            rollout_s = time.perf_counter() - t0
            active = fleet.outcomes(created.rollout_id).get("ACTIVE", 0)
            origin_after = origin_requests(stack.metrics_url)
            cache_after = cache_requests(varnish)
        finally:
            fleet.stop()
            client.close()
            varnish.stop()
    by_status = {k: origin_after.get(k, 0) - origin_before.get(k, 0) for k in origin_after}
    by_kind: dict[str, int] = {}
    for key, count in by_status.items():
        kind = key.split()[0]
        by_kind[kind] = by_kind.get(kind, 0) + count
    served = sum(by_kind.values())
    asked = cache_after - cache_before
    per_device = served / n
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(per_device, "req/device", f"origin requests per device ({n} devices)"),
        baseline=Figure(asked / n, "req/device", "requests per device at the cache"),
        ratio=ratio(per_device, asked / n),
        targets=[
            Target(
                f"origin requests per device per rollout <= {TARGET}",
                per_device <= TARGET,
                f"{served} origin requests for {n} devices",
            )
        ],
        details={
            "devices": n,
            "active": active,
            "bundle_bytes": size,
            "origin_requests_by_kind": by_kind,
            "origin_requests_by_status": by_status,
            "cache_requests": asked,
            "rollout_s": round(rollout_s, 2),
        },
    )
