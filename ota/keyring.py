"""A fresh set of keys and the trust anchor, laid out for one deployment.

DIR/offline/root.pem, release.pem        stay with the release engineers
DIR/online/snapshot.pem, timestamp.pem,
           director.pem                  go to the control plane
DIR/root.json                            the trust anchor devices are provisioned with
DIR/targets.json                         the first (empty) targets, signed by release.pem
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ota.clock import Clock, SystemClock
from ota.trust.keys import generate_key, load_signer
from ota.trust.rootgen import OnlineKeys, create_initial_targets, create_root


@dataclass(frozen=True)
class KeyPaths:
    root_key: Path
    release_key: Path
    snapshot_key: Path
    timestamp_key: Path
    director_key: Path
    root_json: Path
    targets_json: Path

    @classmethod
    def under(cls, directory: Path) -> KeyPaths:
        d = directory.resolve()
        return cls(
            root_key=d / "offline" / "root.pem",
            release_key=d / "offline" / "release.pem",
            snapshot_key=d / "online" / "snapshot.pem",
            timestamp_key=d / "online" / "timestamp.pem",
            director_key=d / "online" / "director.pem",
            root_json=d / "root.json",
            targets_json=d / "targets.json",
        )


def generate_keyring(
    directory: Path, *, clock: Clock | None = None, valid_for: timedelta = timedelta(days=365)
) -> KeyPaths:
    """Generate every key and sign root.json and the first targets.json (refuses to overwrite)."""
    paths = KeyPaths.under(directory)
    expires = (clock or SystemClock()).now() + valid_for
    root = generate_key(paths.root_key)
    release = generate_key(paths.release_key)
    online = OnlineKeys(
        snapshot=generate_key(paths.snapshot_key),
        timestamp=generate_key(paths.timestamp_key),
        director=generate_key(paths.director_key),
    )
    paths.root_json.write_bytes(
        create_root([load_signer(paths.root_key)], [root], [release], online, expires=expires)
    )
    paths.targets_json.write_bytes(
        create_initial_targets([load_signer(paths.release_key)], expires=expires)
    )
    return paths
