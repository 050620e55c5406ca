"""DSSE envelopes around desired states: signing once, verifying exactly those bytes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from ota.device.envelope import DESIRED_STATE_TYPE, open_envelope, pae
from ota.errors import InvalidArgument, VerificationError
from ota.trust import Director
from ota.v1 import common_pb2


def _state(device_id: str = "car-1", generation: int = 7) -> common_pb2.DesiredState:
    state = common_pb2.DesiredState(device_id=device_id, generation=generation)
    issued = datetime(2026, 1, 1, tzinfo=UTC)
    state.issued_at.FromDatetime(issued)
    state.expires_at.FromDatetime(issued + timedelta(days=1))
    state.features.add(feature="nav", version="1.0", sha256=b"\x01" * 32, length=3)
    return state


def _keys(*signers: CryptoSigner) -> dict[str, Key]:
    return {s.public_key.keyid: s.public_key for s in signers}


def test_pae_matches_the_dsse_spec_vector() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_sign_and_open_round_trip_on_the_exact_bytes() -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = Director(signer).sign(_state())
    assert envelope.payload_type == DESIRED_STATE_TYPE
    assert envelope.signatures[0].keyid == signer.public_key.keyid
    wire = envelope.SerializeToString()
    payload = open_envelope(common_pb2.Envelope.FromString(wire), _keys(signer), 1)
    assert payload == envelope.payload
    assert common_pb2.DesiredState.FromString(payload) == _state()


def test_unknown_key_is_refused() -> None:
    envelope = Director(CryptoSigner.generate_ed25519()).sign(_state())
    with pytest.raises(VerificationError, match="0 of the 1") as err:
        open_envelope(envelope, _keys(CryptoSigner.generate_ed25519()), 1)
    assert err.value.reason == "SIGNATURE_INVALID"


def test_forged_signature_under_a_known_keyid_is_refused() -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = Director(CryptoSigner.generate_ed25519()).sign(_state())
    envelope.signatures[0].keyid = signer.public_key.keyid
    with pytest.raises(VerificationError) as err:
        open_envelope(envelope, _keys(signer), 1)
    assert err.value.reason == "SIGNATURE_INVALID"


@pytest.mark.parametrize("where", [0, 20, -1])
def test_tampered_payload_is_refused(where: int) -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = Director(signer).sign(_state())
    payload = bytearray(envelope.payload)
    payload[where] ^= 0x01
    envelope.payload = bytes(payload)
    with pytest.raises(VerificationError) as err:
        open_envelope(envelope, _keys(signer), 1)
    assert err.value.reason == "SIGNATURE_INVALID"


def test_truncated_payload_and_wrong_type_are_refused() -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = Director(signer).sign(_state())
    envelope.payload = envelope.payload[:-1]
    with pytest.raises(VerificationError):
        open_envelope(envelope, _keys(signer), 1)
    retyped = Director(signer).sign(_state())
    retyped.payload_type = "application/vnd.other+proto"
    with pytest.raises(VerificationError, match="payload type"):
        open_envelope(retyped, _keys(signer), 1)


def test_one_key_counts_once_towards_the_threshold() -> None:
    a, b = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    envelope = Director(a).sign(_state())
    envelope.signatures.append(envelope.signatures[0])  # the same signature twice
    with pytest.raises(VerificationError, match="1 of the 2"):
        open_envelope(envelope, _keys(a, b), 2)
    # The same public key listed under a second keyid does not count twice either.
    alias = SSlibKey("alias", a.public_key.keytype, a.public_key.scheme, a.public_key.keyval)
    envelope.signatures[1].keyid = "alias"
    with pytest.raises(VerificationError, match="1 of the 2"):
        open_envelope(envelope, {**_keys(a), "alias": alias}, 2)
    envelope.signatures.add(
        keyid=b.public_key.keyid,
        sig=bytes.fromhex(b.sign(pae(DESIRED_STATE_TYPE, envelope.payload)).signature),
    )
    assert open_envelope(envelope, _keys(a, b), 2) == envelope.payload


def test_no_trusted_key_or_zero_threshold_never_verifies() -> None:
    signer = CryptoSigner.generate_ed25519()
    envelope = Director(signer).sign(_state())
    envelope.ClearField("signatures")
    with pytest.raises(VerificationError):
        open_envelope(envelope, _keys(signer), 0)
    with pytest.raises(VerificationError):
        open_envelope(Director(signer).sign(_state()), {}, 1)


def test_director_refuses_to_sign_an_incomplete_state() -> None:
    director = Director(CryptoSigner.generate_ed25519())
    with pytest.raises(InvalidArgument) as err:
        director.sign(_state(device_id=""))
    assert err.value.field == "device_id"
    with pytest.raises(InvalidArgument):
        director.sign(_state(generation=0))
