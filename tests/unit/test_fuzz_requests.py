"""Screening requests for NUL characters: any depth, named precisely, streams included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ota.api.screening import refuse_nul, screened
from ota.errors import InvalidArgument
from ota.v1 import bundle_pb2, fleet_pb2, rollout_pb2


def _field(call: object) -> str | None:
    with pytest.raises(InvalidArgument) as err:
        call()  # type: ignore[operator]
    return err.value.field


def test_a_nul_is_named_by_its_path() -> None:
    register = fleet_pb2.RegisterDevicesRequest(
        devices=[
            fleet_pb2.DeviceRegistration(device_id="ok"),
            fleet_pb2.DeviceRegistration(device_id="ok", labels={"site": "a\x00"}),
        ]
    )
    assert _field(lambda: refuse_nul(register)) == "devices[1].labels['site']"
    stages = rollout_pb2.CreateRolloutRequest(stages=[rollout_pb2.Stage(name="canary\x00")])
    assert _field(lambda: refuse_nul(stages)) == "stages[0].name"
    assert _field(lambda: refuse_nul(rollout_pb2.GetRolloutRequest(rollout_id="\x00"))) == (
        "rollout_id"
    )


def test_bytes_may_hold_anything_and_clean_text_passes() -> None:
    chunk = bundle_pb2.PublishBundleRequest(chunk=b"\x00\x00")
    assert screened(chunk) is chunk
    fine = fleet_pb2.ListDevicesRequest(selector='model = "ev6"', page_token="abc")
    assert screened(fine) is fine


def test_a_client_stream_is_checked_as_it_is_read() -> None:
    parts = iter(
        [
            bundle_pb2.PublishBundleRequest(chunk=b"1"),
            bundle_pb2.PublishBundleRequest(
                metadata=bundle_pb2.PublishBundleMetadata(feature="nav\x00")
            ),
        ]
    )
    stream = screened(parts)
    assert next(stream).chunk == b"1"
    assert _field(lambda: next(stream)) == "metadata.feature"


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(), st.dictionaries(st.text(), st.text(), max_size=3))
def test_refused_exactly_when_some_text_holds_a_nul(
    device_id: str, model: str, labels: dict[str, str]
) -> None:
    request = fleet_pb2.RegisterDevicesRequest(
        devices=[fleet_pb2.DeviceRegistration(device_id=device_id, model=model, labels=labels)]
    )
    texts = [device_id, model, *labels, *labels.values()]
    try:
        refuse_nul(request)
    except InvalidArgument as err:
        assert any("\x00" in t for t in texts)
        assert err.field and err.field.startswith("devices[0].")
    else:
        assert not any("\x00" in t for t in texts)
