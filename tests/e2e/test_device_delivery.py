"""Delivery over bad networks, downgrades, reverts and power cuts, through the whole system.

A real Mosquitto, the control plane on a real gRPC port, simulated devices. The
devices reach the control plane through `FaultyLink`, a byte-level gRPC proxy
in this process that forwards every call unchanged but can cut a
`DownloadBundle` stream after a given number of bytes or drip it slowly, and
counts the downloads each device makes. Waits are bounded polls of observable
conditions, never bare sleeps.
"""

from __future__ import annotations

import functools
import hashlib
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from device_sim.device import SimDevice
from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import ClockSkew, FailureProfile, compose_fleet
from ota.client import Client
from ota.device.source import Deadlines
from ota.device.state import STATE_FILE, InstalledFeatures
from ota.device.trust import RetryPolicy
from ota.devstack import DevStack
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2, rollout_pb2
from tests.e2e.scenario import (
    MODELS,
    REGIONS,
    publish,
    report,
    report_states,
    run_rollout,
    wait_for,
)

pytestmark = pytest.mark.e2e

FEATURE = "lane-assist"
DOWNLOAD = "/ota.v1.BundleService/DownloadBundle"
PIECE = 1024
FAST_RETRY = RetryPolicy(attempts=5, first_delay=0.05, max_delay=0.4)
ALL_STEPS = [
    "NOTIFIED",
    "DOWNLOADING",
    "DOWNLOADED",
    "VERIFIED",
    "INSTALLING",
    "INSTALLED",
    "ACTIVE",
]


if TYPE_CHECKING:  # grpc-stubs makes these generic; grpcio's classes are not at run time
    _Handler = grpc.GenericRpcHandler[bytes, bytes]
    _MethodHandler = grpc.RpcMethodHandler[bytes, bytes]
else:
    _Handler = grpc.GenericRpcHandler
    _MethodHandler = grpc.RpcMethodHandler


class FaultyLink(_Handler):
    """A gRPC proxy in front of the control plane that can cut or slow bundle downloads.

    Requests and responses pass as bytes, with the caller's authorization and
    deadline. `DownloadBundle` responses are re-cut into 1 KiB pieces so a cut
    can fall anywhere; `cuts[device]` lists, for that device's next calls, after
    how many bytes the stream breaks (UNAVAILABLE); `drip` = (bytes, seconds)
    sends that many bytes per interval, for as long as the caller waits.
    """

    def __init__(self, upstream: str) -> None:
        self._upstream = grpc.insecure_channel(upstream)
        self._server = grpc.server(ThreadPoolExecutor(32, thread_name_prefix="faulty-link"))
        self._server.add_generic_rpc_handlers((self,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.downloads: list[tuple[str, int]] = []  # (device id, offset) of each call
        self.cuts: dict[str, list[int]] = {}
        self.drip: tuple[int, float] | None = None
        self.open_downloads = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._closing.set()
        self._server.stop(grace=None).wait(10)
        self._upstream.close()

    def downloads_by(self, device_id: str) -> list[int]:
        with self._lock:
            return [offset for d, offset in self.downloads if d == device_id]

    def service(self, details: grpc.HandlerCallDetails) -> _MethodHandler | None:
        method: str = details.method
        if method == DOWNLOAD:
            return grpc.unary_stream_rpc_method_handler(self._download)
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._unary, method))

    def _unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            response: bytes = self._upstream.unary_unary(method, None, None)(
                request, metadata=_auth(context), timeout=context.time_remaining()
            )
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        return response

    def _download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        device = _device_of(context)
        offset = bundle_pb2.DownloadBundleRequest.FromString(request).offset
        with self._lock:
            self.downloads.append((device, offset))
            planned = self.cuts.get(device)
            cut = planned.pop(0) if planned else None
            self.open_downloads += 1
        try:
            upstream = self._upstream.unary_stream(DOWNLOAD, None, None)(
                request, metadata=_auth(context), timeout=context.time_remaining()
            )
            context.add_callback(upstream.cancel)
            sent = 0
            for raw in upstream:
                chunk = bundle_pb2.DownloadBundleResponse.FromString(raw).chunk
                size = self.drip[0] if self.drip else PIECE
                for start in range(0, len(chunk), size):
                    piece = chunk[start : start + size]
                    if cut is not None and sent + len(piece) > cut:
                        if cut > sent:
                            yield _response(piece[: cut - sent])
                        context.abort(grpc.StatusCode.UNAVAILABLE, f"link cut after {cut} bytes")
                    if self.drip is not None:
                        self._closing.wait(self.drip[1])
                        if not context.is_active():
                            return  # the caller gave up (its deadline): so does the server
                    sent += len(piece)
                    yield _response(piece)
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details() or "")
        finally:
            with self._lock:
                self.open_downloads -= 1


def _response(chunk: bytes) -> bytes:
    return bundle_pb2.DownloadBundleResponse(chunk=chunk).SerializeToString()


def _auth(context: grpc.ServicerContext) -> tuple[tuple[str, str], ...]:
    return tuple(
        (key, str(value)) for key, value in context.invocation_metadata() if key == "authorization"
    )


def _device_of(context: grpc.ServicerContext) -> str:
    # "Bearer device:<id>:<secret>"
    for key, value in _auth(context):
        if key == "authorization" and value.startswith("Bearer device:"):
            return value.removeprefix("Bearer device:").rpartition(":")[0]
    return ""


@pytest.fixture
def link(stack: DevStack) -> Iterator[FaultyLink]:
    proxy = FaultyLink(stack.server)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@contextmanager
def fleet_behind(
    stack: DevStack, tmp_path: Path, server: str, count: int = 3, **settings: Any
) -> Iterator[SimulatedFleet]:
    settings.setdefault("retry", FAST_RETRY)
    fleet = SimulatedFleet(
        compose_fleet(count, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile(),
            **settings,
        ),
    )
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture
def client(stack: DevStack) -> Iterator[Client]:
    c = Client.connect(stack.server, stack.admin_token)
    try:
        yield c
    finally:
        c.close()


def start_rollout(client: Client, version: str) -> str:
    """Create and start a one-stage rollout to everybody; do not wait for it."""
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature=FEATURE,
            version=version,
            stages=[rollout_pb2.Stage(ppm=1_000_000, min_soak_seconds=0)],
            gate=rollout_pb2.FailureGate(
                max_failure_ppm=50_000, min_sample=5, action=rollout_pb2.GATE_ACTION_PAUSE
            ),
        ),
        metadata=client.metadata,
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id), metadata=client.metadata
    )
    return str(created.rollout_id)


def install_everywhere(client: Client, fleet: SimulatedFleet, version: str, sha: str) -> str:
    """Roll `version` out to every device; return the rollout id once all run it."""
    final = run_rollout(client, version, [1_000_000], timeout=60)
    assert final.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, final.state_reason
    wait_for(lambda: all(runs(d, sha) for d in fleet.devices), what=f"{version} on every device")
    return str(final.rollout_id)


def rollout_state(client: Client, rollout_id: str) -> int:
    got = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return int(got.state)


def runs(device: SimDevice, sha: str) -> bool:
    b = device.installed.get(FEATURE)
    return b is not None and b.active and b.sha256.hex() == sha


def events_of(client: Client, device_id: str, rollout_id: str) -> list[common_pb2.DeviceEvent]:
    response = client.fleet.GetDevice(
        fleet_pb2.GetDeviceRequest(device_id=device_id, event_limit=1000),
        metadata=client.metadata,
    )
    return [e for e in response.events if e.rollout_id == rollout_id]


def steps(events: list[common_pb2.DeviceEvent]) -> list[str]:
    return [common_pb2.DeviceState.Name(e.state) for e in events]


def failures_counted(client: Client, rollout_id: str) -> dict[str, int]:
    return {c.key: c.count for c in report(client, rollout_id).failures_by_reason}


def wait_counted(client: Client, rollout_id: str, expected: dict[str, int]) -> None:
    wait_for(
        lambda: failures_counted(client, rollout_id) == expected,
        what=f"{expected} in the report of {rollout_id}",
        timeout=60,
    )


def on_disk(fleet: SimulatedFleet, device: SimDevice) -> InstalledFeatures:
    return InstalledFeatures.load(fleet.settings.state_dir / device.device_id / STATE_FILE)


# -- (a) cut downloads resume ------------------------------------------------------------


def test_downloads_cut_at_random_points_resume_and_verify(
    stack: DevStack, tmp_path: Path, link: FaultyLink, client: Client
) -> None:
    size = 200_000
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    sha = publish(client, stack, tmp_path, "1.0.0", size=size)
    with fleet_behind(stack, tmp_path, link.address) as fleet:
        plans: dict[str, list[int]] = {}
        for device in fleet.devices:
            remaining, cuts = size, []
            for _ in range(3):  # three cuts, each somewhere inside what is still missing
                cut = rng.randrange(1, remaining)
                cuts.append(cut)
                remaining -= cut
            plans[device.device_id] = cuts
        link.cuts = {d: list(c) for d, c in plans.items()}

        rollout_id = install_everywhere(client, fleet, "1.0.0", sha)

        for device in fleet.devices:
            cuts = plans[device.device_id]
            resumed_at = [sum(cuts[:i]) for i in range(len(cuts) + 1)]
            assert link.downloads_by(device.device_id) == resumed_at, f"seed {seed}"
            kept = device.installed[FEATURE].file.read_bytes()
            assert hashlib.sha256(kept).hexdigest() == sha, f"seed {seed}"
            assert steps(events_of(client, device.device_id, rollout_id)) == ALL_STEPS
        assert report_states(report(client, rollout_id)) == {"ACTIVE": 3}
        assert failures_counted(client, rollout_id) == {}


# -- (b) slow retrieval is cut off by the deadline --------------------------------------


def test_a_stream_too_slow_is_cut_off_by_its_deadline_and_the_device_stays_healthy(
    stack: DevStack, tmp_path: Path, link: FaultyLink, client: Client
) -> None:
    size = 4000
    deadlines = Deadlines(download_base=1.0, download_min_rate=8192)
    retry = RetryPolicy(attempts=3, first_delay=0.05, max_delay=0.2)
    publish(client, stack, tmp_path, "1.0.0", size=size)
    with fleet_behind(stack, tmp_path, link.address, deadlines=deadlines, retry=retry) as fleet:
        before = {d.device_id: dict(d.installed) for d in fleet.devices}
        link.drip = (128, 0.5)  # 256 bytes/s: 4 kB would take 16 s; the deadline allows ~1.5 s

        slow = start_rollout(client, "1.0.0")

        wait_counted(client, slow, {"DOWNLOAD_FAILED": 3})
        budget = retry.attempts * deadlines.download(size) + 2 * retry.max_delay
        for device in fleet.devices:
            events = events_of(client, device.device_id, slow)
            assert steps(events) == ["NOTIFIED", "DOWNLOADING", "FAILED"]
            failed = events[-1]
            assert common_pb2.FailureReason.Name(failed.error_code) == "DOWNLOAD_FAILED"
            took = failed.time.ToDatetime() - events[1].time.ToDatetime()
            assert took < timedelta(seconds=budget + 1.0), took
            offsets = link.downloads_by(device.device_id)
            assert len(offsets) == retry.attempts
            assert offsets == sorted(offsets) and offsets[-1] > 0  # each try resumed
            assert dict(device.installed) == before[device.device_id]
            assert not any(
                p.name.endswith(".part")
                for p in (fleet.settings.state_dir / device.device_id / "downloads").iterdir()
            )
        # The server side let go too: no handler is left streaming to nobody.
        wait_for(lambda: link.open_downloads == 0, what="slow streams to end", timeout=10)

        # Healthy afterwards: the next good desired state installs normally.
        link.drip = None
        wait_for(
            lambda: rollout_state(client, slow) == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="the failed rollout to complete (every device finished, if badly)",
        )
        good = publish(client, stack, tmp_path, "1.1.0", size=size)
        install_everywhere(client, fleet, "1.1.0", good)
        assert failures_counted(client, slow) == {"DOWNLOAD_FAILED": 3}


# -- (c) downgrade refused; revert to last-known-good without a download ------------------


def test_an_older_version_is_refused_and_counted(
    stack: DevStack, tmp_path: Path, link: FaultyLink, client: Client
) -> None:
    publish(client, stack, tmp_path, "1.0.0")
    newer = publish(client, stack, tmp_path, "2.0.0", size=11_000)
    with fleet_behind(stack, tmp_path, link.address) as fleet:
        install_everywhere(client, fleet, "2.0.0", newer)
        before = {d.device_id: (dict(d.installed), dict(d.last_known_good)) for d in fleet.devices}
        downloads = len(link.downloads)
        files = {
            d.device_id: sorted((fleet.settings.state_dir / d.device_id / "downloads").iterdir())
            for d in fleet.devices
        }

        older = start_rollout(client, "1.0.0")

        wait_counted(client, older, {"ROLLBACK_REFUSED": 3})
        for device in fleet.devices:
            events = events_of(client, device.device_id, older)
            assert steps(events) == ["NOTIFIED", "FAILED"]
            assert common_pb2.FailureReason.Name(events[-1].error_code) == "ROLLBACK_REFUSED"
            assert (dict(device.installed), dict(device.last_known_good)) == before[
                device.device_id
            ]
            kept = on_disk(fleet, device)
            assert (dict(kept.installed), dict(kept.last_known_good)) == before[device.device_id]
            assert (
                sorted((fleet.settings.state_dir / device.device_id / "downloads").iterdir())
                == files[device.device_id]
            )
            assert runs(device, newer)
        assert len(link.downloads) == downloads  # refused before any byte was fetched


def test_a_rollback_reactivates_the_last_known_good_without_a_download(
    stack: DevStack, tmp_path: Path, link: FaultyLink, client: Client
) -> None:
    good = publish(client, stack, tmp_path, "1.0.0")
    bad = publish(client, stack, tmp_path, "2.0.0", size=11_000)
    with fleet_behind(stack, tmp_path, link.address) as fleet:
        install_everywhere(client, fleet, "1.0.0", good)
        candidate = install_everywhere(client, fleet, "2.0.0", bad)
        assert all(d.last_known_good[FEATURE].sha256.hex() == good for d in fleet.devices)
        downloads = {d.device_id: len(link.downloads_by(d.device_id)) for d in fleet.devices}
        assert set(downloads.values()) == {2}

        # ota/rollout/exposure.py revert_exposed + ota/store/desired.py revert: a signed
        # desired state with revert=true naming each device's previous bundle.
        client.rollouts.RollbackRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=candidate, reason="bad build"),
            metadata=client.metadata,
        )

        wait_for(
            lambda: report_states(report(client, candidate)) == {"ROLLED_BACK": 3},
            what="every device rolled back",
        )
        for device in fleet.devices:
            assert runs(device, good)
            assert FEATURE not in device.last_known_good
            assert len(link.downloads_by(device.device_id)) == downloads[device.device_id]
            assert device.installed[FEATURE].intact()
            assert steps(events_of(client, device.device_id, candidate)) == [
                *ALL_STEPS,
                "ROLLED_BACK",
            ]
            assert dict(on_disk(fleet, device).installed) == dict(device.installed)
        assert failures_counted(client, candidate) == {}


# -- (d) a power cut between download and install -------------------------------------------


def test_a_device_restarted_between_download_and_install_resumes_and_reports_once(
    stack: DevStack, tmp_path: Path, link: FaultyLink, client: Client
) -> None:
    sha = publish(client, stack, tmp_path, "1.0.0")
    with fleet_behind(stack, tmp_path, link.address) as fleet:
        victim, bystander = fleet.devices[0], fleet.devices[1]
        victim.crash_after_download = lambda a: a.feature == FEATURE
        rollout_id = start_rollout(client, "1.0.0")

        wait_for(lambda: victim.halted, what="the power cut")
        wait_for(lambda: all(runs(d, sha) for d in fleet.devices[1:]), what="the others installed")
        assert FEATURE not in victim.installed
        state_dir = fleet.settings.state_dir / victim.device_id
        kept = [p for p in (state_dir / "downloads").iterdir()]
        assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in kept] == [sha]
        wait_for(
            lambda: steps(events_of(client, victim.device_id, rollout_id)) == ALL_STEPS[:4],
            what="the steps before the cut",
        )

        rebooted = fleet.restart(victim.device_id)

        wait_for(lambda: runs(rebooted, sha), what="the install to finish after the reboot")
        wait_for(
            lambda: report_states(report(client, rollout_id)) == {"ACTIVE": 3},
            what="the report to see all three active",
        )
        assert steps(events_of(client, victim.device_id, rollout_id)) == ALL_STEPS
        assert link.downloads_by(victim.device_id) == [0]  # re-verified from disk
        assert dict(on_disk(fleet, rebooted).installed) == dict(rebooted.installed)

        # A device restarted at rest comes back with the same features and nothing to say.
        events = len(events_of(client, bystander.device_id, rollout_id))
        sent = bystander.record.events_sent
        installed = dict(bystander.installed)
        again = fleet.restart(bystander.device_id)
        assert dict(again.installed) == installed
        wait_for(lambda: again.resumed, what="the bystander to pick up where it was")
        assert again.record.events_sent == sent
        assert len(events_of(client, bystander.device_id, rollout_id)) == events
        assert len(link.downloads_by(bystander.device_id)) == 1


# -- clock skew per device ---------------------------------------------------------------------


def test_devices_with_clocks_far_off_report_why_against_the_rollout(
    stack: DevStack, tmp_path: Path, client: Client
) -> None:
    skew: Callable[[str], timedelta] = ClockSkew.parse(
        ["sim-000000=-21600", "sim-000001=2592000"]  # six hours behind; thirty days ahead
    )
    sha = publish(client, stack, tmp_path, "1.0.0")
    with fleet_behind(stack, tmp_path, stack.server, clock_skew=skew) as fleet:
        behind, ahead, right = fleet.devices
        rollout_id = start_rollout(client, "1.0.0")

        wait_counted(client, rollout_id, {"CLOCK_INVALID": 1, "METADATA_EXPIRED": 1})
        wait_for(lambda: runs(right, sha), what="the device with a good clock to install")
        for device, reason in ((behind, "CLOCK_INVALID"), (ahead, "METADATA_EXPIRED")):
            events = events_of(client, device.device_id, rollout_id)
            assert steps(events) == ["FAILED"]
            assert common_pb2.FailureReason.Name(events[0].error_code) == reason
            assert FEATURE not in device.installed
            assert device.trust.accepted_generation == 0
