"""Keys on disk, the offline root and targets, and what a release engineer signs."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signature
from tuf.api.metadata import Metadata, Root, Targets

from ota.errors import AlreadyExists, InvalidArgument
from ota.signing import (
    OnlineKeys,
    add_target,
    create_initial_targets,
    create_root,
    generate_key,
    load_public_key,
    load_signer,
    target_path_for,
)
from ota.trust.director import director_keys

EXPIRES = datetime(2027, 1, 1, tzinfo=UTC)


def _online() -> tuple[OnlineKeys, CryptoSigner]:
    director = CryptoSigner.generate_ed25519()
    online = OnlineKeys(
        snapshot=CryptoSigner.generate_ed25519().public_key,
        timestamp=CryptoSigner.generate_ed25519().public_key,
        director=director.public_key,
    )
    return online, director


def test_generated_key_round_trips_through_standard_files(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "release"
    key = generate_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = json.loads(path.with_suffix(".pub.json").read_text())
    assert pub["keyid"] == key.keyid and pub["keytype"] == "ed25519"

    signer = load_signer(path)
    signature = signer.sign(b"bundle")
    assert load_public_key(path.with_suffix(".pub.json")) == key
    assert load_public_key(path) == key  # derived from the private PEM
    key.verify_signature(signature, b"bundle")


def test_generate_key_refuses_to_overwrite(tmp_path: Path) -> None:
    generate_key(tmp_path / "k")
    with pytest.raises(AlreadyExists):
        generate_key(tmp_path / "k")


def test_unreadable_keys_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(InvalidArgument, match=r"bad\.pem"):
        load_signer(bad)
    with pytest.raises(InvalidArgument, match="missing"):
        load_signer(tmp_path / "missing")


def test_public_key_with_a_wrong_keyid_is_refused(tmp_path: Path) -> None:
    generate_key(tmp_path / "k")
    pub_path = tmp_path / "k.pub.json"
    doc = json.loads(pub_path.read_text())
    doc["keyid"] = "0" * 64
    pub_path.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="does not match"):
        load_public_key(pub_path)


def test_root_carries_the_director_key_under_its_signatures() -> None:
    root_signer, release = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    online, director = _online()
    data = create_root(
        [root_signer], [root_signer.public_key], [release.public_key], online, expires=EXPIRES
    )
    md: Metadata[Root] = Metadata.from_bytes(data)
    root = md.signed
    # The unknown field and the key no role uses survive parsing and re-serialising...
    assert root.unrecognized_fields["x-ota-director"] == {
        "keyids": [director.public_key.keyid],
        "threshold": 1,
    }
    assert director.public_key.keyid in root.keys
    assert Metadata.from_bytes(md.to_bytes()) == md
    assert root.consistent_snapshot is True and root.version == 1
    # ...and are covered by the root signature.
    root.verify_delegate("root", md.signed_bytes, md.signatures)
    root.unrecognized_fields["x-ota-director"]["keyids"] = ["f" * 64]
    with pytest.raises(Exception, match="signed by 0/1"):
        root.verify_delegate("root", md.signed_bytes, md.signatures)
    keys, threshold = director_keys(Metadata[Root].from_bytes(data).signed)
    assert list(keys) == [director.public_key.keyid] and threshold == 1


def test_root_refuses_an_online_key_that_is_also_a_release_key() -> None:
    root_signer, release = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    online, _ = _online()
    online = OnlineKeys(
        snapshot=release.public_key, timestamp=online.timestamp, director=online.director
    )
    with pytest.raises(InvalidArgument, match="snapshot key") as err:
        create_root(
            [root_signer], [root_signer.public_key], [release.public_key], online, expires=EXPIRES
        )
    assert err.value.field == "online.snapshot"


def test_root_needs_its_threshold_of_root_signatures() -> None:
    a, b, release = (CryptoSigner.generate_ed25519() for _ in range(3))
    online, _ = _online()
    keys = [a.public_key, b.public_key]
    with pytest.raises(InvalidArgument, match="not enough root keys"):
        create_root([a], keys, [release.public_key], online, root_threshold=2, expires=EXPIRES)
    with pytest.raises(InvalidArgument, match="between 1 and"):
        create_root([a, b], keys, [release.public_key], online, root_threshold=3, expires=EXPIRES)
    with pytest.raises(InvalidArgument, match="not one of the root keys"):
        create_root([release], keys, [release.public_key], online, expires=EXPIRES)
    data = create_root(
        [a, b], keys, [release.public_key], online, root_threshold=2, expires=EXPIRES
    )
    assert len(Metadata[Root].from_bytes(data).signatures) == 2


def test_add_target_appends_a_new_version_signed_by_every_signer() -> None:
    r1, r2 = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    initial = create_initial_targets([r1], expires=EXPIRES)
    path = target_path_for("nav", "1.0")
    custom = {"feature": "nav", "version": "1.0", "models": ["ev6"], "min_firmware": "4.2"}
    data = _add(initial, path, custom, [r1, r2])
    md: Metadata[Targets] = Metadata.from_bytes(data)
    assert md.signed.version == 2
    assert md.signed.targets[path].custom == custom
    assert set(md.signatures) == {r1.public_key.keyid, r2.public_key.keyid}
    for signer in (r1, r2):
        sig: Signature = md.signatures[signer.public_key.keyid]
        signer.public_key.verify_signature(sig, md.signed_bytes)

    # The same bundle again is harmless; different bytes under the same path are not.
    assert Metadata[Targets].from_bytes(_add(data, path, custom, [r1])).signed.version == 3
    with pytest.raises(InvalidArgument, match="already published"):
        _add(data, path, custom, [r1], length=4)


def _add(
    current: bytes,
    path: str,
    custom: dict[str, object],
    signers: list[CryptoSigner],
    length: int = 3,
) -> bytes:
    return add_target(
        current,
        target_path=path,
        length=length,
        sha256_hex="ab" * 32,
        custom=custom,
        signers=list(signers),
        expires=EXPIRES,
    )


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"models": []}, "custom.models"),
        ({"feature": "other"}, "target_path"),
        ({"min_firmware": "four"}, "custom.min_firmware"),
        ({"sha256_hex": "AB" * 32}, "sha256_hex"),
        ({"length": 0}, "length"),
    ],
)
def test_add_target_validates_what_devices_rely_on(changes: dict[str, object], field: str) -> None:
    signer = CryptoSigner.generate_ed25519()
    custom = {"feature": "nav", "version": "1.0", "models": ["ev6"], "min_firmware": "4.2"}
    args: dict[str, object] = {"length": 3, "sha256_hex": "ab" * 32}
    for key, value in changes.items():
        if key in args:
            args[key] = value
        else:
            custom[key] = value  # type: ignore[assignment]
    with pytest.raises(InvalidArgument) as err:
        add_target(
            create_initial_targets([signer], expires=EXPIRES),
            target_path=target_path_for("nav", "1.0"),
            custom=custom,
            signers=[signer],
            expires=EXPIRES,
            **args,  # type: ignore[arg-type]
        )
    assert err.value.field == field


@pytest.mark.parametrize("feature", ["", "Nav", "../etc", "a/b", "x" * 64])
def test_target_path_refuses_unsafe_feature_names(feature: str) -> None:
    with pytest.raises(InvalidArgument):
        target_path_for(feature, "1.0")


def test_target_path_layout() -> None:
    assert target_path_for("lane-assist", "2.0.1") == "features/lane-assist/2.0.1.bundle"
    with pytest.raises(InvalidArgument):
        target_path_for("nav", "1.0/../../x")


def test_expiry_is_normalised_to_utc() -> None:
    signer = CryptoSigner.generate_ed25519()
    local = datetime(2027, 1, 1, 14, tzinfo=timezone(timedelta(hours=2)))
    md = Metadata[Targets].from_bytes(create_initial_targets([signer], expires=local))
    assert md.signed.expires == datetime(2027, 1, 1, 12, tzinfo=UTC)


def test_each_audience_package_exports_exactly_its_all() -> None:
    import ota.device
    import ota.signing
    import ota.trust

    for package in (ota.device, ota.signing, ota.trust):
        public = {
            name
            for name, value in vars(package).items()
            if not name.startswith("_")
            and getattr(value, "__name__", "").rsplit(".", 1)[0] != package.__name__
        }
        assert public == set(package.__all__), package.__name__


def test_a_key_file_that_is_not_there_is_named_with_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "snapshot.pm"
    with pytest.raises(InvalidArgument) as err:
        load_signer(missing, field="snapshot_key")
    assert str(err.value) == f"snapshot_key: cannot read {missing}: No such file or directory"
    (tmp_path / "garbage.pem").write_text("not a key")
    with pytest.raises(InvalidArgument) as bad:
        load_signer(tmp_path / "garbage.pem")
    assert str(bad.value).startswith(
        f"key: cannot load a private signing key from {tmp_path / 'garbage.pem'}"
    )
