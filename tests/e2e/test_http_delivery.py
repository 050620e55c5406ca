"""TUF metadata and bundles over HTTP through a real shared cache (Varnish).

The control plane serves its delivery origin on a real port; a private
``varnishd`` caches it; devices fetch through the cache. Between the cache and
the origin, `OriginLink` forwards every request and can tamper with or cut a
bundle body. What the origin served is read from its own Prometheus metrics.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from ota.broker.process import free_port
from ota.client import Client
from ota.clock import SystemClock
from ota.device.http_source import HttpSource
from ota.device.source import Deadlines
from ota.device.trust import DeviceTrust
from ota.devstack import DevStack
from ota.errors import VerificationError
from ota.signing.keys import generate_key
from ota.signing.rootgen import RootChange
from ota.v1 import bundle_pb2, common_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.cache_harness import OriginLink, VarnishHandle, private_varnish
from tests.conftest import endpoint
from tests.e2e.scenario import MODELS, publish, report, report_states, run_rollout, wait_for
from tests.e2e.test_device_delivery import FAST_RETRY, failures_counted, fleet_behind, runs

pytestmark = pytest.mark.e2e

TIMESTAMP_MAX_AGE = 2
FLEET = 200  # the 2 000-device figure is `make bench` (docs/PERFORMANCE.md)


@pytest.fixture
def stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={
            "origin_listen": "127.0.0.1:0",
            "origin_timestamp_max_age": TIMESTAMP_MAX_AGE,
        },
    )
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture
def link(stack: DevStack) -> Iterator[OriginLink]:
    hop = OriginLink(stack.control_plane.origin_url)
    hop.start()
    try:
        yield hop
    finally:
        hop.stop()


@pytest.fixture
def cache(tmp_path: Path, link: OriginLink) -> Iterator[VarnishHandle]:
    with private_varnish(tmp_path / "varnish", "127.0.0.1", link.port) as handle:
        yield handle


@pytest.fixture
def client(stack: DevStack) -> Iterator[Client]:
    c = Client.connect(stack.server, stack.admin_token)
    try:
        yield c
    finally:
        c.close()


def origin_requests(stack: DevStack) -> Counter[tuple[str, str]]:
    """ota_origin_requests_total by (kind, status), scraped from the control plane."""
    text = urllib3.request("GET", stack.metrics_url, timeout=10).data.decode()
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "ota_origin_requests":
            for sample in family.samples:
                if sample.name == "ota_origin_requests_total":
                    counts[sample.labels["kind"], sample.labels["status"]] += int(sample.value)
    return counts


def bundle_of(client: Client, version: str) -> bundle_pb2.Bundle:
    got: bundle_pb2.Bundle = client.bundles.GetBundle(
        bundle_pb2.GetBundleRequest(name=f"bundles/lane-assist/{version}"), metadata=client.metadata
    )
    return got


def assignment(bundle: bundle_pb2.Bundle) -> common_pb2.FeatureAssignment:
    return common_pb2.FeatureAssignment(
        feature=bundle.feature,
        version=bundle.version,
        target_path=bundle.target_path,
        sha256=bundle.sha256,
        length=bundle.length,
    )


class RecordingSource(HttpSource):
    """An HttpSource that notes the offset of every bundle request, and sets `received`
    once bundle bytes have arrived."""

    def __init__(self, url: str, received: threading.Event | None = None) -> None:
        super().__init__(url, deadlines=Deadlines())
        self.offsets: list[int] = []
        self.received = received or threading.Event()

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        self.offsets.append(offset)
        return self._noting(super().fetch_target(target_path, offset, max_length))

    def _noting(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.received.set()
            yield chunk


def lone_device(stack: DevStack, tmp_path: Path, source: HttpSource, name: str) -> DeviceTrust:
    return DeviceTrust(
        device_id=name,
        model=MODELS[0],
        firmware="4.2.0",
        state_dir=tmp_path / name,
        trusted_root=stack.keys.root_json.read_bytes(),
        source=source,
        clock=SystemClock(),
        retry=FAST_RETRY,
        durable=False,
    )


def test_a_rollout_through_the_cache_asks_the_origin_for_each_file_a_few_times(
    stack: DevStack, tmp_path: Path, link: OriginLink, cache: VarnishHandle, client: Client
) -> None:
    sha = publish(client, stack, tmp_path, "1.0.0", size=300_000)
    started = time.monotonic()
    with fleet_behind(
        stack, tmp_path, stack.server, count=FLEET, delivery="http", origin_url=cache.url
    ) as fleet:
        final = run_rollout(client, "1.0.0", [1_000_000], timeout=240)
        assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
        wait_for(lambda: all(runs(d, sha) for d in fleet.devices), what="1.0.0 everywhere")
        wait_for(
            lambda: report_states(report(client, final.rollout_id)) == {"ACTIVE": FLEET},
            what="every device reported ACTIVE",
        )
    elapsed = time.monotonic() - started

    served = origin_requests(stack)
    # The origin's own count agrees with what passed between cache and origin.
    assert sum(served.values()) == len(link.requests)
    per_path = Counter(path for path, _ in link.requests)
    immutable = {p: n for p, n in per_path.items() if p != "/metadata/timestamp.json"}
    bundle_paths = [p for p in immutable if p.startswith("/targets/")]
    assert bundle_paths == [f"/targets/{bundle_path(client, '1.0.0', sha)}"]
    # Each immutable file (and the not-yet-existing next root) a small constant number
    # of times; a 404 is kept for the timestamp's lifetime, so it may come back once
    # per lifetime. Not once per device.
    for path, n in immutable.items():
        limit = 2 if served_ok(path) else 2 + elapsed / TIMESTAMP_MAX_AGE
        assert n <= limit, (path, n, per_path)
    assert per_path["/metadata/timestamp.json"] <= 2 + elapsed / TIMESTAMP_MAX_AGE
    assert served["bundle", "200"] == 1
    # Far fewer requests than devices, whatever the fleet size.
    assert sum(served.values()) < FLEET / 5, served


def served_ok(path: str) -> bool:
    return not path.startswith("/metadata/") or not path.endswith(".root.json")


def bundle_path(client: Client, version: str, sha: str) -> str:
    target = bundle_of(client, version).target_path
    parent, sep, name = target.rpartition("/")
    return f"{parent}{sep}{sha}.{name}"


def test_a_download_cut_midway_resumes_through_the_cache(
    stack: DevStack, tmp_path: Path, link: OriginLink, cache: VarnishHandle, client: Client
) -> None:
    size = 400_000
    sha = publish(client, stack, tmp_path, "1.0.0", size=size)
    link.cut_next = 150_000
    source = RecordingSource(cache.url, received=link.part_passed_on)
    device = lone_device(stack, tmp_path, source, "cut-1")

    kept = device.fetch_bundle(assignment(bundle_of(client, "1.0.0")))

    assert hashlib.sha256(kept.read_bytes()).hexdigest() == sha
    assert source.offsets[0] == 0 and len(source.offsets) == 2, source.offsets
    assert 0 < source.offsets[1] <= 150_000  # resumed where the cut left it, with Range
    bundle_fetches = [r for r in link.requests if r[0].startswith("/targets/")]
    assert len(bundle_fetches) == 2  # the cut fetch, and the cache's fetch for the resume
    # A second device resumes nothing: the whole bundle is in the cache now.
    again = RecordingSource(cache.url)
    lone_device(stack, tmp_path, again, "cut-2").fetch_bundle(
        assignment(bundle_of(client, "1.0.0"))
    )
    assert again.offsets == [0]
    assert len([r for r in link.requests if r[0].startswith("/targets/")]) == 2


def test_a_tampered_cache_entry_is_refused_and_a_purge_heals_it(
    stack: DevStack, tmp_path: Path, link: OriginLink, cache: VarnishHandle, client: Client
) -> None:
    sha = publish(client, stack, tmp_path, "1.0.0", size=50_000)
    url = f"/targets/{bundle_path(client, '1.0.0', sha)}"
    link.tamper = True  # the cache fills with an altered byte in the middle
    with fleet_behind(
        stack, tmp_path, stack.server, count=3, delivery="http", origin_url=cache.url
    ) as fleet:
        created = client.rollouts.CreateRollout(
            rollout_pb2.CreateRolloutRequest(
                feature="lane-assist",
                version="1.0.0",
                stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=0)],
            ),
            metadata=client.metadata,
        )
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id),
            metadata=client.metadata,
        )
        wait_for(
            lambda: failures_counted(client, created.rollout_id) == {"HASH_MISMATCH": 3},
            what="three HASH_MISMATCH failures in the report",
            timeout=120,
        )
        assert not any(runs(d, sha) for d in fleet.devices)
    link.tamper = False

    # Until purged, the cache still holds the altered bytes: another device refuses them.
    with pytest.raises(VerificationError) as refused:
        lone_device(
            stack, tmp_path, HttpSource(cache.url, deadlines=Deadlines()), "other-1"
        ).fetch_bundle(assignment(bundle_of(client, "1.0.0")))
    assert refused.value.reason == "HASH_MISMATCH"

    assert cache.purge(url) == 200
    before = origin_requests(stack)["bundle", "200"]
    healed = lone_device(
        stack, tmp_path, HttpSource(cache.url, deadlines=Deadlines()), "other-2"
    ).fetch_bundle(assignment(bundle_of(client, "1.0.0")))
    assert hashlib.sha256(healed.read_bytes()).hexdigest() == sha
    assert origin_requests(stack)["bundle", "200"] == before + 1


def test_with_a_delivery_token_the_cache_refuses_strangers_and_shares_one_copy(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    token = "fleet-token-1"
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={"origin_listen": "127.0.0.1:0", "origin_token": token},
    )
    try:
        origin = dev.control_plane.origin_server
        assert origin is not None
        with private_varnish(tmp_path / "varnish", "127.0.0.1", origin.port, token=token) as cache:
            path = "/metadata/1.root.json"
            assert urllib3.request("GET", cache.url + path, retries=False).status == 401
            wrong = {"Authorization": "Bearer nope"}
            assert urllib3.request("GET", cache.url + path, headers=wrong).status == 401
            good = {"Authorization": f"Bearer {token}"}
            for _ in range(3):
                answer = urllib3.request("GET", cache.url + path, headers=good)
                assert answer.status == 200
                assert answer.data == dev.keys.root_json.read_bytes()
            # Strangers never reached the origin; the fleet's three asks cost it one.
            assert origin_requests(dev)["metadata", "200"] == 1
            assert origin_requests(dev)["metadata", "401"] == 0
            # A device with the token verifies through the cache as any other.
            source = HttpSource(cache.url, deadlines=Deadlines(), token=token)
            lone_device(dev, tmp_path, source, "tok-1").refresh_metadata()
    finally:
        dev.stop()


def test_a_rotation_purges_the_next_roots_404_so_devices_behind_the_cache_learn_of_it(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    cache_port = free_port()
    dev = DevStack.start(
        tmp_path / "stack",
        broker=endpoint(broker),
        config_overrides={
            "origin_listen": "127.0.0.1:0",
            "origin_timestamp_max_age": TIMESTAMP_MAX_AGE,
            "origin_purge_urls": f"http://127.0.0.1:{cache_port}",
        },
    )
    origin = dev.control_plane.origin_server
    assert origin is not None
    client = Client.connect(dev.server, dev.admin_token)
    try:
        with private_varnish(
            tmp_path / "varnish", "127.0.0.1", origin.port, port=cache_port
        ) as cache:
            # The next root's 404 is kept long, since a rotation purges it...
            probe = urllib3.request("GET", cache.url + "/metadata/2.root.json", retries=False)
            assert probe.status == 404
            assert probe.headers["Cache-Control"] == "public, max-age=300"
            device = lone_device(
                dev, tmp_path, HttpSource(cache.url, deadlines=Deadlines()), "rot-1"
            )
            device.refresh_metadata()
            assert trusted_root_version(tmp_path / "rot-1") == 1
            # ... so the device's own probe was the cache's answer, not the origin's.
            assert origin_requests(dev)["metadata", "404"] == 1

            new_root = tmp_path / "root-2.pem"
            plan = client.plan_root_rotation(
                RootChange(root_keys=[generate_key(new_root)]),
                root_keys=[dev.keys.root_key, new_root],
            )
            assert client.rotate_root(plan).root_version == 2

            # Far sooner than the 404's 300 s: only the purge can have removed it.
            def learned() -> bool:
                device.refresh_metadata()
                return trusted_root_version(tmp_path / "rot-1") == 2

            wait_for(learned, what="the device trusting root v2 through the cache", timeout=60)
    finally:
        client.close()
        dev.stop()


def trusted_root_version(device_dir: Path) -> int:
    version: int = json.loads((device_dir / "tuf" / "root.json").read_bytes())["signed"]["version"]
    return version
