"""Release signing with a 2-of-3 threshold and key rotation, through the real CLI and gRPC.

A publication short of the threshold waits, invisible to devices, until a
second engineer's `ota bundle sign`; refusals leave nothing visible; a root
rotation built by `ota keys rotate-root` is served and followed by devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from tuf.api.metadata import Metadata, Root, Targets

from ota.client import Client
from ota.clock import SystemClock
from ota.device import DeviceTrust
from ota.device.source import GrpcSource
from ota.devstack import DevStack
from ota.errors import FailedPrecondition, VerificationError
from ota.keyring import KeyPaths, generate_keyring
from ota.signing import generate_key, load_signer
from ota.signing.release import add_target, target_path_for
from ota.v1 import bundle_pb2, common_pb2, fleet_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
FEATURE = "lane-assist"


@dataclass
class Team:
    """A control plane whose root asks for 2 of 3 release keys, and the engineers' keys."""

    stack: DevStack
    keys: KeyPaths
    client: Client
    tmp_path: Path

    def ota(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OTA_SERVER": self.stack.server, "OTA_TOKEN": self.stack.admin_token}
        return subprocess.run(
            [str(BIN / "ota"), *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def bundle_file(self, version: str, size: int = 5000) -> Path:
        path = self.tmp_path / f"{FEATURE}-{version}.bin"
        path.write_bytes(bytes((i * 13 + len(version)) % 251 for i in range(size)))
        return path

    def publish(self, version: str, *keys: Path, extra: tuple[str, ...] = ()) -> Path:
        file = self.bundle_file(version)
        keyargs = [a for k in keys for a in ("--key", str(k))]
        done = self.ota(
            "bundle", "publish", file, "--feature", FEATURE, "--version", version,
            "--model", "ev6", *keyargs, *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return file

    def get(self, version: str) -> bundle_pb2.Bundle:
        result: bundle_pb2.Bundle = self.client.bundles.GetBundle(
            bundle_pb2.GetBundleRequest(name=f"bundles/{FEATURE}/{version}"),
            metadata=self.client.metadata,
        )
        return result

    def visible_targets(self) -> dict[str, object]:
        """The targets devices fetch right now (newest version)."""
        targets: dict[str, object] = json.loads(self.client.metadata_bytes("targets"))["signed"][
            "targets"
        ]
        return targets

    def listed(self) -> dict[str, int]:
        response = self.client.bundles.ListBundles(
            bundle_pb2.ListBundlesRequest(feature=FEATURE), metadata=self.client.metadata
        )
        return {b.name: b.state for b in response.bundles}

    def device(self, name: str, secret: str = "") -> DeviceTrust:
        """A device as the simulator builds one: its own credentials, the v1 trust anchor.

        With `secret`, the device registered earlier, starting again from its own state.
        """
        secret = secret or self.register(name)
        return DeviceTrust(
            device_id=name,
            model="ev6",
            firmware="4.2.0",
            state_dir=self.tmp_path / "devices" / name,
            trusted_root=self.keys.root_json.read_bytes(),
            source=GrpcSource(self.client.channel, name, secret),
            clock=SystemClock(),
        )

    def register(self, name: str) -> str:
        creds = self.client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=name, model="ev6", region="eu", firmware="4.2.0"
                    )
                ]
            ),
            metadata=self.client.metadata,
        ).credentials[0]
        return str(creds.secret)


@pytest.fixture
def team(tmp_path: Path, broker: BrokerHandle) -> Iterator[Team]:
    # DevStack keeps a keyring it finds: make it 2 of 3 before it starts.
    keys = generate_keyring(tmp_path / "stack" / "keys", release_keys=3, release_threshold=2)
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker))
    client = Client.connect(stack.server, stack.admin_token)
    try:
        assert stack.keys.release_keys == keys.release_keys
        yield Team(stack, keys, client, tmp_path)
    finally:
        client.close()
        stack.stop()


def _assignment(file: Path, version: str) -> common_pb2.FeatureAssignment:
    data = file.read_bytes()
    return common_pb2.FeatureAssignment(
        feature=FEATURE,
        version=version,
        target_path=target_path_for(FEATURE, version),
        sha256=hashlib.sha256(data).digest(),
        length=len(data),
    )


def test_two_of_three_publication_waits_invisible_until_the_second_engineer_signs(
    team: Team,
) -> None:
    k1, k2, _ = team.keys.release_keys
    name, path = f"bundles/{FEATURE}/2.0.0", target_path_for(FEATURE, "2.0.0")
    before = team.client.metadata_bytes("targets")
    file = team.bundle_file("2.0.0")
    published = team.ota(
        "bundle", "publish", file, "--feature", FEATURE, "--version", "2.0.0",
        "--model", "ev6", "--min-firmware", "4.0", "--key", k1,
    )  # fmt: skip
    assert published.returncode == 0, published.stderr
    assert f"pending {name}: 1 of 2 release signatures" in published.stdout
    assert "not visible to devices" in published.stdout

    pending = team.get("2.0.0")
    assert pending.state == bundle_pb2.BUNDLE_STATE_PENDING
    assert list(pending.signer_keyids) == [load_signer(k1).public_key.keyid]
    assert (pending.signatures_required, pending.targets_version) == (2, 2)
    assert team.listed() == {name: bundle_pb2.BUNDLE_STATE_PENDING}
    # Invisible to devices: not in the served targets, not downloadable, not found by TUF.
    assert team.client.metadata_bytes("targets") == before
    assert path not in team.visible_targets()
    with pytest.raises(grpc.RpcError) as missing:
        list(
            team.client.bundles.DownloadBundle(
                bundle_pb2.DownloadBundleRequest(target_path=path), metadata=team.client.metadata
            )
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    device = team.device("car-1")
    with pytest.raises(VerificationError, match="not signed by a release key"):
        device.fetch_bundle(_assignment(file, "2.0.0"))
    early = team.ota("rollout", "create", "--feature", FEATURE, "--version", "2.0.0")
    assert early.returncode == 1 and "FAILED_PRECONDITION" in early.stderr
    assert "not published yet" in early.stderr

    # The same engineer signing again adds nothing: a key counts once.
    again = team.ota("bundle", "sign", name, "--key", k1)
    assert again.returncode == 0, again.stderr
    assert "had already signed" in again.stdout and "1 of 2" in again.stdout
    assert team.get("2.0.0").state == bundle_pb2.BUNDLE_STATE_PENDING
    assert path not in team.visible_targets()

    # A second engineer reviews what is pending, against their own copy, and signs.
    signed = team.ota("bundle", "sign", name, "--key", k2, "--file", file)
    assert signed.returncode == 0, signed.stderr
    assert path in signed.stdout and hashlib.sha256(file.read_bytes()).hexdigest() in signed.stdout
    assert f"published {name}: 2 of 2" in signed.stdout
    done = team.get("2.0.0")
    assert done.state == bundle_pb2.BUNDLE_STATE_PUBLISHED
    assert set(done.signer_keyids) == {load_signer(k).public_key.keyid for k in (k1, k2)}
    assert path in team.visible_targets()
    assert device.fetch_bundle(_assignment(file, "2.0.0")).read_bytes() == file.read_bytes()


def test_refusals_leave_nothing_visible(team: Team) -> None:
    k1, k2, _ = team.keys.release_keys
    before = team.client.metadata_bytes("targets")

    # The uploaded bytes differ from what the keys signed: refused, with or without threshold.
    signed_for = team.bundle_file("3.0.0")
    uploaded = team.tmp_path / "swapped.bin"
    uploaded.write_bytes(bytes(reversed(signed_for.read_bytes())))
    for keys in ([k1, k2], [k1]):
        with pytest.raises(grpc.RpcError) as refused:
            _publish_other_bytes(team, signed_for, uploaded.read_bytes(), keys)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "differs from what was signed" in str(refused.value.details())
    assert team.listed() == {}

    # Too few signatures, visibility required: refused, nothing kept.
    short = team.ota(
        "bundle", "publish", team.bundle_file("3.0.0"), "--feature", FEATURE,
        "--version", "3.0.0", "--model", "ev6", "--key", k1, "--require-visible",
    )  # fmt: skip
    assert short.returncode == 1
    assert "FAILED_PRECONDITION" in short.stderr and "1 of the 2 release keys" in short.stderr
    assert team.listed() == {}

    # A key that is not a release key of the root: refused, naming it.
    impostor = team.tmp_path / "impostor.pem"
    impostor_id = generate_key(impostor).keyid
    forged = team.ota(
        "bundle", "publish", team.bundle_file("3.0.0"), "--feature", FEATURE,
        "--version", "3.0.0", "--model", "ev6", "--key", k1, "--key", impostor,
    )  # fmt: skip
    assert forged.returncode == 1
    assert "PERMISSION_DENIED" in forged.stderr and impostor_id in forged.stderr
    assert team.listed() == {}

    # ... and on a pending publication too.
    team.publish("3.0.0", k1)
    name = f"bundles/{FEATURE}/3.0.0"
    cosign = team.ota("bundle", "sign", name, "--key", impostor)
    assert cosign.returncode == 1
    assert "PERMISSION_DENIED" in cosign.stderr and impostor_id in cosign.stderr
    # The signer's own copy differs from what is pending: refused before signing.
    wrong_copy = team.ota("bundle", "sign", name, "--key", k2, "--file", uploaded)
    assert wrong_copy.returncode == 1 and "do not sign" in wrong_copy.stderr
    assert team.get("3.0.0").state == bundle_pb2.BUNDLE_STATE_PENDING
    assert len(team.get("3.0.0").signer_keyids) == 1
    assert team.client.metadata_bytes("targets") == before


def _publish_other_bytes(team: Team, signed_for: Path, data: bytes, keys: list[Path]) -> None:
    """A client that signs one file and uploads another (a swap in transit)."""
    signed_data = signed_for.read_bytes()
    version = "3.0.0"
    path = target_path_for(FEATURE, version)
    signed = add_target(
        team.client.metadata_bytes("targets"),
        target_path=path,
        length=len(signed_data),
        sha256_hex=hashlib.sha256(signed_data).hexdigest(),
        custom={"feature": FEATURE, "version": version, "models": ["ev6"]},
        signers=[load_signer(k) for k in keys],
        expires=SystemClock().now() + timedelta(days=30),
    )
    meta = bundle_pb2.PublishBundleMetadata(
        feature=FEATURE, version=version, target_path=path, signed_targets=signed
    )
    team.client.bundles.PublishBundle(
        iter(
            [
                bundle_pb2.PublishBundleRequest(metadata=meta),
                bundle_pb2.PublishBundleRequest(chunk=data),
            ]
        ),
        metadata=team.client.metadata,
    )


def test_a_pending_publication_overtaken_by_another_must_be_rebased(team: Team) -> None:
    k1, k2, k3 = team.keys.release_keys
    team.publish("4.0.0", k1)
    team.publish("4.1.0", k2, k3)  # signed by the threshold: committed at once
    name = f"bundles/{FEATURE}/4.0.0"
    assert team.get("4.0.0").state == bundle_pb2.BUNDLE_STATE_STALE
    stale = team.ota("bundle", "list", "--state", "stale", "--format", "json")
    assert [b["name"] for b in json.loads(stale.stdout)["bundles"]] == [name], stale.stderr
    late = team.ota("bundle", "sign", name, "--key", k2)
    assert late.returncode == 1 and "Re-publish" in late.stderr
    with pytest.raises(grpc.RpcError) as aborted:
        team.client.bundles.SignBundle(
            bundle_pb2.SignBundleRequest(
                name=name, signatures=[bundle_pb2.TargetsSignature(keyid="ab" * 32, sig="00")]
            ),
            metadata=team.client.metadata,
        )
    assert aborted.value.code() == grpc.StatusCode.ABORTED
    assert "Re-publish" in str(aborted.value.details())

    # Publishing it again re-bases it on the current targets; then it completes.
    team.publish("4.0.0", k1)
    assert team.get("4.0.0").state == bundle_pb2.BUNDLE_STATE_PENDING
    assert team.ota("bundle", "sign", name, "--key", k3).returncode == 0
    assert team.get("4.0.0").state == bundle_pb2.BUNDLE_STATE_PUBLISHED
    assert {target_path_for(FEATURE, v) for v in ("4.0.0", "4.1.0")} <= set(team.visible_targets())


def test_root_and_release_key_rotation_through_the_cli(team: Team) -> None:
    k1, k2, _ = team.keys.release_keys
    file = team.publish("5.0.0", k1, k2)
    device = team.device("car-9")
    device.refresh_metadata()
    keys = team.tmp_path / "rotation"
    created = team.ota("keys", "new", keys / "root-2.pem", keys / "release-a.pem")
    assert created.returncode == 0, created.stderr

    # A root signed only by the new key is refused, locally and by the server.
    alone = team.ota("keys", "rotate-root", "--old-key", keys / "root-2.pem", "--new-key",
                     keys / "root-2.pem")  # fmt: skip
    assert alone.returncode == 1
    assert "needs 1 signature(s) by the current root keys (v1)" in alone.stderr
    md = Metadata[Root].from_bytes(team.client.metadata_bytes("root"))
    md.signed.version = 2
    new_root_key = load_signer(keys / "root-2.pem")
    md.signed.keys[new_root_key.public_key.keyid] = new_root_key.public_key
    md.signed.roles["root"].keyids = [new_root_key.public_key.keyid]
    md.sign(new_root_key)
    with pytest.raises(grpc.RpcError) as refused:
        team.client.bundles.RotateRoot(
            bundle_pb2.RotateRootRequest(new_root=md.to_bytes()), metadata=team.client.metadata
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError):
        team.client.metadata_bytes("root", 2)

    # Root v2: a new root key, and one new release key (1 of 1) re-signing the targets.
    rotated = team.ota(
        "keys", "rotate-root", "--trusted-root", team.keys.root_json,
        "--old-key", team.keys.root_key, "--new-key", keys / "root-2.pem",
        "--release-pub", keys / "release-a.pub.json", "--release-threshold", "1",
        "--release-key", keys / "release-a.pem",
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert "uploaded root v2 (targets v3)" in rotated.stdout
    served = Metadata[Root].from_bytes(team.client.metadata_bytes("root"))
    assert served.signed.version == 2
    assert served.signed.roles["root"].keyids == [new_root_key.public_key.keyid]
    assert served.signed.roles["targets"].keyids == [
        load_signer(keys / "release-a.pem").public_key.keyid
    ]
    targets = Metadata[Targets].from_bytes(team.client.metadata_bytes("targets"))
    assert targets.signed.version == 3
    assert target_path_for(FEATURE, "5.0.0") in targets.signed.targets

    # Devices follow (v1 -> v2 through the cross-signature) and still verify the bundle.
    device.refresh_metadata()
    assert device.fetch_bundle(_assignment(file, "5.0.0")).read_bytes() == file.read_bytes()
    # The retired release keys are refused; the new one publishes alone.
    old = team.ota(
        "bundle", "publish", team.bundle_file("6.0.0"), "--feature", FEATURE, "--version",
        "6.0.0", "--model", "ev6", "--key", k1, "--key", k2,
    )  # fmt: skip
    assert old.returncode == 1 and "not a release key of root v2" in old.stderr
    team.publish("6.0.0", keys / "release-a.pem")
    assert team.get("6.0.0").state == bundle_pb2.BUNDLE_STATE_PUBLISHED


def test_online_keys_rotate_with_an_overlapping_root_and_a_restart(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    state = tmp_path / "stack"
    keys = generate_keyring(state / "keys")
    stack = DevStack.start(state, broker=endpoint(broker))
    team = Team(stack, keys, Client.connect(stack.server, stack.admin_token), tmp_path)
    new = tmp_path / "online-2"
    roles = ("snapshot", "timestamp", "director")
    try:
        secret = team.register("car-7")
        team.device("car-7", secret).refresh_metadata()
        assert team.ota("keys", "new", *(new / f"{r}.pem" for r in roles)).returncode == 0
        # Root v2 names the old and the new online keys: the running plane keeps working.
        both = [
            a
            for r in roles
            for a in (f"--{r}-pub", keys.root_json.parent / "online" / f"{r}.pub.json",
                      f"--{r}-pub", new / f"{r}.pub.json")
        ]  # fmt: skip
        overlap = team.ota("keys", "rotate-root", "--old-key", keys.root_key, *both)
        assert overlap.returncode == 0, overlap.stderr
        team.device("car-7", secret).refresh_metadata()  # now on v2, old keys still signing
    finally:
        team.client.close()
        stack.stop()

    # Restart with the new private keys (same database, same trust anchor file).
    switched = {f"{r}_key": new / f"{r}.pem" for r in roles}
    stack = DevStack.start(state, broker=endpoint(broker), config_overrides=switched)
    team = Team(stack, keys, Client.connect(stack.server, stack.admin_token), tmp_path)
    try:
        file = team.publish("7.0.0", keys.release_key)  # snapshot, timestamp by the new keys
        only_new = [a for r in roles for a in (f"--{r}-pub", new / f"{r}.pub.json")]
        final = team.ota("keys", "rotate-root", "--old-key", keys.root_key, *only_new)
        assert final.returncode == 0, final.stderr
        assert "uploaded root v3" in final.stdout
        root = Metadata[Root].from_bytes(team.client.metadata_bytes("root")).signed
        assert root.roles["snapshot"].keyids == [load_signer(new / "snapshot.pem").public_key.keyid]

        # The device (restarted from its own state) walks v2 -> v3 and trusts the new keys.
        device = team.device("car-7", secret)
        device.refresh_metadata()
        assert device.fetch_bundle(_assignment(file, "7.0.0")).read_bytes() == file.read_bytes()
    finally:
        team.client.close()
        stack.stop()

    # A control plane started with the retired keys refuses to run.
    with pytest.raises(FailedPrecondition, match="is not the snapshot key of root v3"):
        DevStack.start(state, broker=endpoint(broker)).stop()
