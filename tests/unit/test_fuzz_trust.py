"""Fuzzing what a device verifies: DSSE envelopes, signed desired states, TUF metadata bytes.

Every input an attacker can put on the wire ends in one of two ways: accepted
because the director (or the TUF roles) really signed it, or refused with a
`VerificationError` that names a FailureReason. Nothing else may escape: a
device that crashes on a message can be kept from ever updating.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ota.device import DeviceTrust
from ota.device.envelope import open_envelope, pae
from ota.domain.states import FAILURE_REASONS
from ota.errors import VerificationError
from ota.trust.director import DESIRED_STATE_TYPE
from ota.v1 import common_pb2
from tests.unit.test_trust_device import World

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
flips = st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=4)
_ids = itertools.count()


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def _fresh_device(world: World) -> tuple[DeviceTrust, str]:
    device_id = f"car-{next(_ids)}"
    return world.device(device_id=device_id), device_id


def _mutate(data: bytes, changes: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(data)
    for pos, value in changes:
        buf[pos % len(buf)] = value
    return bytes(buf[: cut % (len(buf) + 1)] if cut >= 0 else buf)


def _refused(error: VerificationError) -> None:
    assert error.reason in FAILURE_REASONS, error.reason
    assert error.message


@FUZZ
@given(data=st.binary(max_size=400))
def test_random_bytes_as_an_envelope_are_refused(world: World, data: bytes) -> None:
    device = world.device()
    with pytest.raises(VerificationError) as err:
        device.verify_desired_state(data)
    _refused(err.value)
    assert device.accepted_generation == 0


@FUZZ
@given(changes=flips, cut=st.integers(-1, 400))
def test_mutated_envelopes_are_refused_or_are_the_signed_original(
    world: World, changes: list[tuple[int, int]], cut: int
) -> None:
    device, device_id = _fresh_device(world)
    original = world.desired(device_id=device_id)
    signed = common_pb2.DesiredState.FromString(common_pb2.Envelope.FromString(original).payload)
    try:
        state = device.verify_desired_state(_mutate(original, changes, cut))
    except VerificationError as exc:
        _refused(exc)
        assert device.accepted_generation == 0
        return
    # Only bytes outside the signed payload changed (e.g. an extra unknown field).
    assert state == signed


@FUZZ
@given(
    keyid=st.text(max_size=70),
    sig=st.binary(max_size=130),
    payload_type=st.sampled_from([DESIRED_STATE_TYPE, "", "application/json"]),
    copies=st.integers(0, 3),
)
def test_forged_signature_entries_are_refused(
    world: World, keyid: str, sig: bytes, payload_type: str, copies: int
) -> None:
    envelope = common_pb2.Envelope.FromString(world.desired())
    envelope.payload_type = payload_type
    del envelope.signatures[:]
    real = world.director_key.public_key.keyid
    for _ in range(copies):
        envelope.signatures.add(keyid=real, sig=sig)
    envelope.signatures.add(keyid=keyid, sig=sig)
    with pytest.raises(VerificationError) as err:
        open_envelope(envelope, {real: world.director_key.public_key}, 1)
    _refused(err.value)


_timestamps = st.integers(-(2**63), 2**63 - 1)


@FUZZ
@given(
    generation=st.integers(0, 2**64 - 1),
    issued=_timestamps,
    expires=_timestamps,
    nanos=st.integers(-(2**31), 2**31 - 1),
    device_id=st.sampled_from(["car-1", "", "car-2", "car-1\u202e"]),
)
def test_signed_desired_states_with_odd_fields_are_refused_with_a_reason(
    world: World, *, generation: int, issued: int, expires: int, nanos: int, device_id: str
) -> None:
    # What a buggy or compromised control plane could sign: the device still only
    # refuses with a reason or accepts a state it can act on.
    state = common_pb2.DesiredState(device_id=device_id, generation=generation)
    state.issued_at.seconds, state.issued_at.nanos = issued, nanos
    state.expires_at.seconds = expires
    payload = state.SerializeToString()
    sig = world.director_key.sign(pae(DESIRED_STATE_TYPE, payload))
    envelope = common_pb2.Envelope(payload=payload, payload_type=DESIRED_STATE_TYPE)
    envelope.signatures.add(keyid=sig.keyid, sig=bytes.fromhex(sig.signature))
    device = world.device()
    try:
        accepted = device.verify_desired_state(envelope.SerializeToString())
    except VerificationError as exc:
        _refused(exc)
        return
    assert accepted.device_id == "car-1" and accepted.generation == generation
    assert accepted.expires_at.ToDatetime() > world.clock.now().replace(tzinfo=None)


@FUZZ
@given(
    role=st.sampled_from(["root", "timestamp", "snapshot", "targets"]),
    changes=flips,
    cut=st.integers(-1, 3000),
)
def test_mutated_tuf_metadata_is_refused_with_a_reason(
    world: World, role: str, changes: list[tuple[int, int]], cut: int
) -> None:
    genuine = world.repo.metadata(role)
    assert genuine is not None
    mutated = _mutate(genuine, changes, cut) or b" "  # the test source serves b"" as absent
    world.source.metadata_override = {role: mutated}
    device, _ = _fresh_device(world)
    try:
        device.refresh_metadata()
    except VerificationError as exc:
        _refused(exc)
        return
    finally:
        world.source.metadata_override = {}
    # Accepted: the change left the signed content intact (JSON whitespace, say),
    # or concerned a root the device takes from its own embedded copy.
    assert role == "root" or _same_json(mutated, genuine)


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return bool(json.loads(a) == json.loads(b))
    except ValueError:
        return False
