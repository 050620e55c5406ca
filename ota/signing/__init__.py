"""Offline signing, on the release engineers' machines: keys, the root, targets.

keys     signing keys on disk (PKCS#8 PEM + TUF key JSON)
rootgen  root v1 (with the director key) and empty targets v1; root rotations
release  add a bundle to targets and sign it
"""

from ota.signing.keys import generate_key, load_public_key, load_signer
from ota.signing.release import add_target, target_path_for
from ota.signing.rootgen import OnlineKeys, create_initial_targets, create_root

__all__ = [
    "OnlineKeys",
    "add_target",
    "create_initial_targets",
    "create_root",
    "generate_key",
    "load_public_key",
    "load_signer",
    "target_path_for",
]
