"""A fresh set of keys and the trust anchor, laid out for one deployment.

DIR/offline/root.pem, release.pem        stay with the root holders and release engineers
           (root-1.pem..root-N.pem, release-1.pem..release-N.pem with N > 1 keys)
DIR/online/snapshot.pem, timestamp.pem,
           director.pem                  go to the control plane
DIR/root.json                            the trust anchor devices are provisioned with
DIR/targets.json                         the first (empty) targets, signed by every release key

Each private key is a PKCS#8 PEM file with its public half beside it as
``NAME.pub.json`` (the TUF key dict). With several release keys each one goes
to a different engineer; `release_threshold` of them must sign every bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ota.clock import Clock, SystemClock
from ota.errors import InvalidArgument
from ota.signing.keys import generate_key, load_signer
from ota.signing.rootgen import OnlineKeys, create_initial_targets, create_root

_NUMBERED = re.compile(r"^(?P<stem>root|release)-(?P<n>[1-9][0-9]*)\.pem$")


@dataclass(frozen=True)
class KeyPaths:
    root_keys: tuple[Path, ...]
    release_keys: tuple[Path, ...]
    snapshot_key: Path
    timestamp_key: Path
    director_key: Path
    root_json: Path
    targets_json: Path

    @property
    def root_key(self) -> Path:
        """The first root key (the only one in a 1-of-1 keyring)."""
        return self.root_keys[0]

    @property
    def release_key(self) -> Path:
        """The first release key (the only one in a 1-of-1 keyring)."""
        return self.release_keys[0]

    @classmethod
    def under(
        cls, directory: Path, *, root_count: int | None = None, release_count: int | None = None
    ) -> KeyPaths:
        """The layout in `directory`; counts default to the keys found there (else one each)."""
        d = directory.resolve()
        offline = d / "offline"
        return cls(
            root_keys=_offline_keys(offline, "root", root_count),
            release_keys=_offline_keys(offline, "release", release_count),
            snapshot_key=d / "online" / "snapshot.pem",
            timestamp_key=d / "online" / "timestamp.pem",
            director_key=d / "online" / "director.pem",
            root_json=d / "root.json",
            targets_json=d / "targets.json",
        )


def generate_keyring(
    directory: Path,
    *,
    clock: Clock | None = None,
    valid_for: timedelta = timedelta(days=365),
    root_keys: int = 1,
    root_threshold: int = 1,
    release_keys: int = 1,
    release_threshold: int = 1,
) -> KeyPaths:
    """Generate every key and sign root.json and the first targets.json (refuses to overwrite).

    `root_threshold` of `root_keys` sign each new root; `release_threshold` of
    `release_keys` sign each bundle. The defaults make a 1-of-1 keyring.
    """
    for name, count, threshold in (
        ("root", root_keys, root_threshold),
        ("release", release_keys, release_threshold),
    ):
        if count < 1:
            raise InvalidArgument("must be at least 1", field=f"{name}_keys")
        if not 1 <= threshold <= count:
            raise InvalidArgument(
                f"must be between 1 and the number of {name} keys ({count})",
                field=f"{name}_threshold",
            )
    paths = KeyPaths.under(directory, root_count=root_keys, release_count=release_keys)
    expires = (clock or SystemClock()).now() + valid_for
    roots = [generate_key(p) for p in paths.root_keys]
    releases = [generate_key(p) for p in paths.release_keys]
    online = OnlineKeys(
        snapshot=generate_key(paths.snapshot_key),
        timestamp=generate_key(paths.timestamp_key),
        director=generate_key(paths.director_key),
    )
    # Only a threshold of root keys is needed; every one signs root v1 anyway.
    paths.root_json.write_bytes(
        create_root(
            [load_signer(p) for p in paths.root_keys],
            roots,
            releases,
            online,
            root_threshold=root_threshold,
            release_threshold=release_threshold,
            expires=expires,
        )
    )
    paths.targets_json.write_bytes(
        create_initial_targets([load_signer(p) for p in paths.release_keys], expires=expires)
    )
    return paths


def _offline_keys(offline: Path, stem: str, count: int | None) -> tuple[Path, ...]:
    if count is None:
        # An existing keyring: numbered keys if that is what it holds, else the single one.
        numbered = sorted(
            (int(m["n"]), path)
            for path in offline.glob(f"{stem}-*.pem")
            if (m := _NUMBERED.match(path.name)) and m["stem"] == stem
        )
        if numbered and not (offline / f"{stem}.pem").exists():
            return tuple(path for _, path in numbered)
        count = 1
    if count == 1:
        return (offline / f"{stem}.pem",)
    return tuple(offline / f"{stem}-{i}.pem" for i in range(1, count + 1))
