"""Trust: the TUF image repository, director signatures, device-side verification.

keys        signing keys on disk (PKCS#8 PEM + TUF key JSON)
rootgen     offline: root v1 (with the director key) and empty targets v1
release     release engineer: add a bundle to targets and sign it
repository  control plane: accept targets, publish snapshot and timestamp
served      control plane: metadata as devices fetch it, from memory
director    control plane: DSSE-signed desired states; `open_envelope` verifies
device      device: verify desired states, fetch bundles through python-tuf
retry       device: wait out an unreachable control plane, retry broken transfers
"""

from ota.trust.device import DeviceTrust, MetadataSource, StaleDesiredState
from ota.trust.director import DESIRED_STATE_TYPE, Director, open_envelope, pae
from ota.trust.freshness import TimestampRefresher
from ota.trust.keys import generate_key, load_public_key, load_signer
from ota.trust.release import add_target, target_path_for
from ota.trust.repository import AcceptedTarget, ImageRepository, MetadataStore
from ota.trust.retry import ControlPlaneUnreachable, RetryPolicy, Unreachable
from ota.trust.rootgen import OnlineKeys, create_initial_targets, create_root

__all__ = [
    "DESIRED_STATE_TYPE",
    "AcceptedTarget",
    "ControlPlaneUnreachable",
    "DeviceTrust",
    "Director",
    "ImageRepository",
    "MetadataSource",
    "MetadataStore",
    "OnlineKeys",
    "RetryPolicy",
    "StaleDesiredState",
    "TimestampRefresher",
    "Unreachable",
    "add_target",
    "create_initial_targets",
    "create_root",
    "generate_key",
    "load_public_key",
    "load_signer",
    "open_envelope",
    "pae",
    "target_path_for",
]
