"""The ota device SDK: what firmware needs to be an ota device, and nothing of the server.

Importing it loads no SQL, no gRPC server code and no part of the control
plane's repository (a test holds it to that), so it fits on a device.

    trust     `DeviceTrust`: check a desired state (DSSE signatures by the director
              keys of the trusted root, device id, generation, expiry, clock), refresh
              TUF metadata, verify a target against the release-signed targets and
              download it with resume (`RetryPolicy`); the trust state on disk
    envelope  `open_envelope`: the DSSE check on its own
    retry     `RetryPolicy`: wait out an unreachable control plane (then
              CONTROL_PLANE_UNREACHABLE, a wait, not a failure), retry broken transfers
    source    `GrpcSource`: TUF metadata, bundle bytes and the desired state over gRPC,
              each call under a deadline (`Deadlines`)
    http_source `HttpSource`: TUF metadata and bundle bytes over HTTP(S), through a
              cache or CDN
    state     `InstalledFeatures`: installed and last-known-good bundle per feature,
              work in flight, orders settled; saved atomically
    events    `EventSequence`: event numbers that survive reboots
    enroll    `enroll`, `renew`: make the device's key (it never leaves the device),
              send a certificate signing request with a one-time enrollment token,
              renew the certificate over mutual TLS before it expires

A minimal device loop::

    trust = DeviceTrust(device_id=..., model=..., firmware=..., state_dir=...,
                        trusted_root=root_json_bytes, source=GrpcSource(channel, id, secret),
                        clock=SystemClock())
    state = trust.verify_desired_state(envelope_bytes)   # VerificationError: report FAILED
    for assignment in state.features:
        path = trust.fetch_bundle(assignment)            # verified file, kept on disk
        ...install it, then report each step with EventSequence.next() as its seq

`ota.agent` (`ota-agent`) is the complete device built on it; `device_sim`
runs thousands of simulated ones.
"""

from ota.device.envelope import DESIRED_STATE_TYPE, open_envelope
from ota.device.events import EventSequence
from ota.device.http_source import HttpSource
from ota.device.retry import ControlPlaneUnreachable, RetryPolicy, Unreachable
from ota.device.source import Deadlines, GrpcSource
from ota.device.state import InstalledBundle, InstalledFeatures, reached_at_least
from ota.device.trust import (
    DeviceTrust,
    MetadataSource,
    StaleDesiredState,
    check_not_downgrade,
    write_atomically,
)

__all__ = [
    "DESIRED_STATE_TYPE",
    "ControlPlaneUnreachable",
    "Deadlines",
    "DeviceTrust",
    "EventSequence",
    "GrpcSource",
    "HttpSource",
    "InstalledBundle",
    "InstalledFeatures",
    "MetadataSource",
    "RetryPolicy",
    "StaleDesiredState",
    "Unreachable",
    "check_not_downgrade",
    "open_envelope",
    "reached_at_least",
    "write_atomically",
]
