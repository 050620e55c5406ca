"""Bad input at the gRPC surface, against a real server on a real port.

Hypothesis builds requests for every RPC from the messages' descriptors (odd
unicode, NUL characters, huge and negative numbers, unknown enum values, out of
range timestamps, random page tokens), mixed with names of resources that exist.
Each call succeeds or fails with a precise status naming the field: never
UNKNOWN or INTERNAL. Then the conventions one by one: request_id retries, page
tokens, stale etags, oversized messages.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ota.api.auth import ADMIN, METHOD_ROLES
from ota.api.server import MAX_MESSAGE_BYTES
from ota.client import Client
from ota.devstack import DevStack
from ota.signing import add_target, load_signer, target_path_for
from ota.v1 import bundle_pb2, fleet_pb2, report_pb2, rollout_pb2
from tests.broker_harness import private_broker
from tests.conftest import endpoint, fresh_postgres_database
from tests.e2e.scenario import MODELS, publish

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A caller's mistake, or a state the request does not fit: all precise.
PRECISE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# "field: what is wrong", the field a path such as devices[0].labels['k'] or a key
# of a plan document.
FIELD_FIRST = re.compile(r"^\S[^\n]*?: \S")
SERVICES = [
    (bundle_pb2, "BundleService"),
    (rollout_pb2, "RolloutService"),
    (fleet_pb2, "FleetService"),
    (report_pb2, "ReportService"),
]


class Seeded:
    """A stack with one device, one bundle and one rollout for requests to name."""

    def __init__(self, stack: DevStack, tmp: Path) -> None:
        self.stack = stack
        self.client = Client.connect(stack.server, stack.admin_token)
        self.client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id="car-1", model="ev6", region="eu", firmware="4.2.0"
                    )
                ]
            ),
            metadata=self.client.metadata,
        )
        publish(self.client, stack, tmp, "1.0.0")
        self.rollout = self.create_rollout()

    def create_rollout(self, **fields: Any) -> rollout_pb2.Rollout:
        request = rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version="1.0.0",
            stages=[rollout_pb2.Stage(ppm=100_000), rollout_pb2.Stage(ppm=1_000_000)],
            **fields,
        )
        created: rollout_pb2.Rollout = self.client.rollouts.CreateRollout(
            request, metadata=self.client.metadata
        )
        return created

    def stub(self, service: str) -> Any:
        return {
            "BundleService": self.client.bundles,
            "RolloutService": self.client.rollouts,
            "FleetService": self.client.fleet,
            "ReportService": self.client.reports,
        }[service]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    # PostgreSQL too: it refuses what SQLite stores (NUL characters, over-long text).
    with ExitStack() as cleanup:
        database_url = None
        if request.param == "postgresql":
            admin_url = os.environ.get("OTA_TEST_DATABASE_URL", "")
            if not admin_url:
                pytest.skip("OTA_TEST_DATABASE_URL is not set (CI sets it)")
            database_url = cleanup.enter_context(fresh_postgres_database(admin_url))
        tmp = tmp_path_factory.mktemp("bad-input")
        broker = cleanup.enter_context(private_broker(tmp / "broker"))
        stack = DevStack.start(tmp / "stack", broker=endpoint(broker), database_url=database_url)
        try:
            world = Seeded(stack, tmp)
            yield world
            world.client.close()
        finally:
            stack.stop()


# -- requests built from descriptors -----------------------------------------------------

odd_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\u202e", "🚗" * 3, "../../etc/passwd", "*", "%s"]),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=200, max_size=3000),
)
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 1000, 1001, low, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _hinted(name: str, seeded: Seeded) -> st.SearchStrategy[str] | None:
    rid = seeded.rollout.rollout_id
    hints = {
        "rollout_id": [rid, "r-00000000"],
        "device_id": ["car-1", "car-404"],
        "name": ["bundles/lane-assist/1.0.0", f"rollouts/{rid}", "bundles/x/9"],
        "feature": ["lane-assist"],
        "version": ["1.0.0", "9.9.9"],
        "role": ["root", "timestamp", "snapshot", "targets"],
        "selector": ['model = "ev6"', "model in (ev6, ev9) and firmware >= 4.2", "(("],
        "target_path": [seeded.rollout.bundle, "lane-assist/1.0.0.bin"],
        "page_token": [base64.urlsafe_b64encode(b'{"after": "", "scope": ""}').decode()],
        "etag": [seeded.rollout.etag, "W/0"],
    }
    if name not in hints:
        return None
    return st.one_of(st.sampled_from(hints[name]), odd_text)


def _scalar(field: FieldDescriptor, seeded: Seeded) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        hinted = _hinted(field.name, seeded)
        return odd_text if hinted is None else hinted
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=300), st.just(b'{"signed": {}, "signatures": []}'))
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 1000))
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, width=32)
    if field.type in INT_RANGES:
        return _integers(*INT_RANGES[field.type])
    raise AssertionError(f"no strategy for {field.full_name}")


def message_of(descriptor: Descriptor, seeded: Seeded, depth: int = 0) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(descriptor)
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                key, value = field.message_type.fields
                optional[field.name] = st.dictionaries(
                    _scalar(key, seeded), _scalar(value, seeded), max_size=3
                )
                continue
            if depth >= 2:
                continue
            one = message_of(field.message_type, seeded, depth + 1)
        else:
            one = _scalar(field, seeded)
        if field.is_repeated:
            optional[field.name] = st.lists(one, max_size=3)
        else:
            optional[field.name] = one
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: _build(cls, kw))


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.is_repeated:
            target.extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def _methods() -> list[tuple[str, MethodDescriptor]]:
    return [
        (service, method)
        for module, service in SERVICES
        for method in module.DESCRIPTOR.services_by_name[service].methods
    ]


def _call(seeded: Seeded, service: str, method: MethodDescriptor, request: Any) -> None:
    rpc = getattr(seeded.stub(service), method.name)
    kwargs = {"metadata": seeded.client.metadata, "timeout": 20}
    if method.server_streaming:
        for _ in rpc(request, **kwargs):
            break  # one answer is enough; WatchRollout would go on
    else:
        rpc(request, **kwargs)


def _assert_precise(error: grpc.RpcError) -> None:
    code, details = error.code(), error.details() or ""
    assert code in PRECISE, f"{code}: {details}"
    assert details.strip(), code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert FIELD_FIRST.match(details), f"no field named: {details!r}"


@pytest.mark.parametrize(
    ("service", "method"), _methods(), ids=[f"{s}.{m.name}" for s, m in _methods()]
)
@FUZZ
@given(data=st.data())
def test_every_rpc_answers_fuzzed_requests_precisely(
    seeded: Seeded, service: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    strategy = message_of(method.input_type, seeded)
    request: Any
    if method.client_streaming:
        request = iter(data.draw(st.lists(strategy, max_size=3)))
    else:
        request = data.draw(strategy)
    try:
        _call(seeded, service, method, request)
    except grpc.RpcError as error:
        if ADMIN not in METHOD_ROLES.get(f"/ota.v1.{service}/{method.name}", frozenset({ADMIN})):
            # A device's own method (renewing its certificate): the admin token the
            # fuzz calls with is refused before the request is read.
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
            return
        _assert_precise(error)


# -- the conventions, one by one --------------------------------------------------------


def test_create_rollout_with_a_request_id_is_idempotent(seeded: Seeded) -> None:
    first = seeded.create_rollout(request_id="req-create-1", selector='model = "ev6"')
    again = seeded.create_rollout(request_id="req-create-1", selector='model = "ev6"')
    assert again.rollout_id == first.rollout_id
    with pytest.raises(grpc.RpcError) as e:
        seeded.create_rollout(request_id="req-create-1", selector='model = "ev9"')
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith("request_id: ")
    listed = seeded.client.rollouts.ListRollouts(
        rollout_pb2.ListRolloutsRequest(feature="lane-assist", page_size=1000),
        metadata=seeded.client.metadata,
    ).rollouts
    assert sum(r.selector == 'model = "ev9"' for r in listed) == 0


def _publication(seeded: Seeded, version: str, data: bytes, request_id: str) -> list[Any]:
    """What `ota bundle publish` sends, with a request_id of the test's choosing."""
    client = seeded.client
    path = target_path_for("wipers", version)
    signed = add_target(
        client.metadata_bytes("targets"),
        target_path=path,
        length=len(data),
        sha256_hex=hashlib.sha256(data).hexdigest(),
        custom={"feature": "wipers", "version": version, "models": MODELS},
        signers=[load_signer(seeded.stack.keys.release_key)],
        expires=datetime.now(UTC) + timedelta(days=30),
    )
    meta = bundle_pb2.PublishBundleMetadata(
        feature="wipers",
        version=version,
        target_path=path,
        signed_targets=signed,
        request_id=request_id,
    )
    return [
        bundle_pb2.PublishBundleRequest(metadata=meta),
        bundle_pb2.PublishBundleRequest(chunk=data),
    ]


def test_publish_bundle_with_a_request_id_is_idempotent(seeded: Seeded) -> None:
    client = seeded.client
    first_parts = _publication(seeded, "2.0.0", b"two" * 100, "req-publish-1")
    others = [
        _publication(seeded, "2.0.1", b"two" * 100, "req-publish-1"),  # another version
        _publication(seeded, "2.0.0", b"TWO" * 100, "req-publish-1"),  # other bytes
    ]
    first = client.bundles.PublishBundle(iter(first_parts), metadata=client.metadata)
    # The response was lost; the caller retries the very same request.
    again = client.bundles.PublishBundle(iter(first_parts), metadata=client.metadata)
    assert (again.name, again.sha256, again.state) == (first.name, first.sha256, first.state)

    for other in others:
        with pytest.raises(grpc.RpcError) as e:
            client.bundles.PublishBundle(iter(other), metadata=client.metadata)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (e.value.details() or "").startswith("metadata.request_id: ")
    with pytest.raises(grpc.RpcError) as e:
        client.bundles.GetBundle(
            bundle_pb2.GetBundleRequest(name="bundles/wipers/2.0.1"), metadata=client.metadata
        )
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    got = client.bundles.GetBundle(
        bundle_pb2.GetBundleRequest(name=first.name), metadata=client.metadata
    )
    assert got.sha256 == first.sha256


def _list_devices(seeded: Seeded, token: str, selector: str = "") -> fleet_pb2.ListDevicesResponse:
    response: fleet_pb2.ListDevicesResponse = seeded.client.fleet.ListDevices(
        fleet_pb2.ListDevicesRequest(page_size=1, page_token=token, selector=selector),
        metadata=seeded.client.metadata,
    )
    return response


def test_tampered_or_cross_filter_page_tokens_are_refused(seeded: Seeded) -> None:
    seeded.client.fleet.RegisterDevices(
        fleet_pb2.RegisterDevicesRequest(
            devices=[
                fleet_pb2.DeviceRegistration(
                    device_id=f"page-{i}", model="ev9", region="us", firmware="4.2.0"
                )
                for i in range(3)
            ]
        ),
        metadata=seeded.client.metadata,
    )
    token = _list_devices(seeded, "").next_page_token
    assert token
    assert _list_devices(seeded, token).devices  # the genuine token works

    body, _, digest = token.partition(".")
    raw = base64.urlsafe_b64decode(body)
    edited = raw.replace(b'"after":"', b'"after":"page-')  # continue elsewhere
    assert edited != raw
    tampered = [
        token[:-6] + ("AAAA==" if not token.endswith("AAAA==") else "BBBB=="),
        token[: len(token) // 2],
        token[::-1],
        f"{base64.urlsafe_b64encode(edited).decode()}.{digest}",
        base64.urlsafe_b64encode(b'{"after": "page-0", "scope": ""}').decode(),
        "🚗.🚗",
    ]
    for bad in tampered:
        with pytest.raises(grpc.RpcError) as e:
            _list_devices(seeded, bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert (e.value.details() or "").startswith("page_token: ")
    with pytest.raises(grpc.RpcError) as e:
        _list_devices(seeded, token, selector='model = "ev9"')  # another filter
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith("page_token: ")


def test_a_command_with_a_stale_etag_is_aborted_and_changes_nothing(seeded: Seeded) -> None:
    rollout = seeded.create_rollout(selector='region = "eu"')
    client = seeded.client
    started = client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=rollout.rollout_id, etag=rollout.etag),
        metadata=client.metadata,
    )
    assert started.etag != rollout.etag
    with pytest.raises(grpc.RpcError) as e:
        client.rollouts.PauseRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=rollout.rollout_id, etag=rollout.etag),
            metadata=client.metadata,
        )
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert "etag" in (e.value.details() or "")
    now = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout.rollout_id), metadata=client.metadata
    )
    assert now.state != rollout_pb2.ROLLOUT_STATE_PAUSED


def test_an_oversized_request_is_resource_exhausted_and_the_server_stays_up(
    seeded: Seeded,
) -> None:
    client = seeded.client
    huge = "x" * (MAX_MESSAGE_BYTES + 1024)
    with pytest.raises(grpc.RpcError) as e:
        client.fleet.ListDevices(
            fleet_pb2.ListDevicesRequest(selector=huge), metadata=client.metadata
        )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (
        client.fleet.GetDevice(
            fleet_pb2.GetDeviceRequest(device_id="car-1"), metadata=client.metadata
        ).device.device_id
        == "car-1"
    )


def test_found_by_fuzzing_nul_characters_and_huge_versions_are_caller_mistakes(
    seeded: Seeded,
) -> None:
    # Regressions: on PostgreSQL a NUL character in any string field, and on
    # either database a metadata version beyond the column's range, used to be INTERNAL.
    client = seeded.client
    cases = [
        (
            lambda: client.fleet.GetDevice(
                fleet_pb2.GetDeviceRequest(device_id="car\x00-1"), metadata=client.metadata
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "device_id: ",
        ),
        (
            lambda: client.fleet.RegisterDevices(
                fleet_pb2.RegisterDevicesRequest(
                    devices=[
                        fleet_pb2.DeviceRegistration(
                            device_id="car-9", model="ev6", region="eu", labels={"k": "v\x00"}
                        )
                    ]
                ),
                metadata=client.metadata,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "devices[0].labels['k']: ",
        ),
        *[
            (
                lambda v=version: client.bundles.GetMetadata(  # type: ignore[misc]
                    bundle_pb2.GetMetadataRequest(role="root", version=v),
                    metadata=client.metadata,
                ),
                grpc.StatusCode.NOT_FOUND,
                "version: ",
            )
            for version in (2**31, 2**64 - 1)
        ],
    ]
    for call, code, prefix in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == code, e.value.details()
        assert (e.value.details() or "").startswith(prefix), e.value.details()
