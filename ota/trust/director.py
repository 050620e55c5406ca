"""Director signatures: DSSE envelopes over a serialised `DesiredState`.

DSSE (https://github.com/secure-systems-lab/dsse/blob/master/protocol.md) signs
``PAE(payloadType, payload)``, so the payload is verified exactly as received
and never re-serialised. The director's keys and threshold come from the
``x-ota-director`` field of the trusted TUF root; devices verify with
`ota.device.envelope`.
"""

from __future__ import annotations

from securesystemslib.signer import Signer  # type: ignore[attr-defined, unused-ignore]

from ota.device.envelope import DESIRED_STATE_TYPE, director_keys, open_envelope, pae
from ota.errors import InvalidArgument
from ota.v1 import common_pb2

# Verification is the device's side (`ota.device.envelope`); re-exported for the control plane.
__all__ = ["DESIRED_STATE_TYPE", "Director", "director_keys", "open_envelope", "pae"]


class Director:
    """Signs each device's desired state with the control plane's online director key."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    @property
    def keyid(self) -> str:
        return str(self._signer.public_key.keyid)

    def sign(self, state: common_pb2.DesiredState) -> common_pb2.Envelope:
        """Serialise `state` once and sign exactly those bytes."""
        if not state.device_id:
            raise InvalidArgument("a desired state needs a device_id", field="device_id")
        if state.generation == 0:
            raise InvalidArgument("generation must be at least 1", field="generation")
        if not state.HasField("expires_at"):
            raise InvalidArgument("a desired state needs expires_at", field="expires_at")
        payload = state.SerializeToString(deterministic=True)
        sig = self._signer.sign(pae(DESIRED_STATE_TYPE, payload))
        return common_pb2.Envelope(
            payload=payload,
            payload_type=DESIRED_STATE_TYPE,
            signatures=[
                common_pb2.EnvelopeSignature(keyid=sig.keyid, sig=bytes.fromhex(sig.signature))
            ],
        )
