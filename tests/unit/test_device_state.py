"""The device's installed features on disk: atomic, complete, and refusing to forget."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ota.device.state import STATE_FILE, InstalledFeatures, reached_at_least, settled_key
from ota.device.trust import check_not_downgrade
from ota.errors import FailedPrecondition, VerificationError
from ota.v1 import common_pb2


def _assignment(
    tmp_path: Path, version: str, *, rollout: str = "r-1", revert: bool = False
) -> tuple[common_pb2.FeatureAssignment, Path]:
    data = f"bundle {version}".encode() * 100
    file = tmp_path / "downloads" / f"nav-{version}"
    file.parent.mkdir(exist_ok=True)
    file.write_bytes(data)
    a = common_pb2.FeatureAssignment(
        feature="nav",
        version=version,
        target_path=f"features/nav/{version}.bundle",
        sha256=hashlib.sha256(data).digest(),
        length=len(data),
        active=True,
        rollout_id=rollout,
        revert=revert,
    )
    return a, file


def test_installed_bundles_survive_a_restart(tmp_path: Path) -> None:
    state = InstalledFeatures.load(tmp_path / STATE_FILE)
    one, one_file = _assignment(tmp_path, "1.0")
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    state.install(one, one_file)
    state.settle(one)
    state.install(two, two_file)
    state.save()

    again = InstalledFeatures.load(tmp_path / STATE_FILE)

    assert again.installed == state.installed
    assert again.last_known_good == state.last_known_good
    assert again.installed["nav"].version == "2.0"
    assert again.last_known_good["nav"].file == one_file
    assert again.reached(two) == "INSTALLING"  # the install is not reported finished yet
    assert again.is_settled(one) is False  # a settled mark belongs to the last assignment only
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    # Paths are kept relative to the state directory, so it can move as a whole.
    assert doc["features"]["nav"]["installed"]["file"] == "downloads/nav-2.0"


def test_a_state_kept_in_memory_writes_nothing(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    a, file = _assignment(tmp_path, "1.0")
    state.install(a, file)
    state.save()
    assert not (tmp_path / STATE_FILE).exists()


def test_a_write_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / STATE_FILE
    state = InstalledFeatures.load(path)
    one, one_file = _assignment(tmp_path, "1.0")
    state.install(one, one_file)
    state.save()
    before = path.read_bytes()

    def power_cut(src: object, dst: object) -> None:
        raise OSError("power cut before the rename")

    monkeypatch.setattr("ota.device.trust.os.replace", power_cut)
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    state.install(two, two_file)
    with pytest.raises(OSError):
        state.save()

    assert path.read_bytes() == before
    assert InstalledFeatures.load(path).installed["nav"].version == "1.0"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b'{"format": 99, "features": {}}',
        b'{"format": 1}',
        b'{"format": 1, "features": {"nav": {"installed": {"version": "1", "sha256": "00"}}}}',
    ],
)
def test_an_unreadable_state_is_refused_not_forgotten(tmp_path: Path, content: bytes) -> None:
    # Starting empty would let an older bundle in as an "upgrade".
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(FailedPrecondition, match="unreadable"):
        InstalledFeatures.load(tmp_path / STATE_FILE)


def test_last_known_good_is_the_active_bundle_replaced(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    one, one_file = _assignment(tmp_path, "1.0")
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    three, three_file = _assignment(tmp_path, "3.0", rollout="r-3")
    state.install(one, one_file)
    assert state.last_known_good == {}
    state.install(two, two_file)
    assert state.last_known_good["nav"].version == "1.0"
    state.install(three, three_file)
    assert state.last_known_good["nav"].version == "2.0"

    back = state.revert_to_last_known_good("nav")

    assert (back.version, back.active) == ("2.0", True)
    assert state.installed["nav"] == back
    assert state.last_known_good == {}
    with pytest.raises(FailedPrecondition):
        state.revert_to_last_known_good("nav")


def test_a_deactivated_bundle_is_nobodys_fallback(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    one, one_file = _assignment(tmp_path, "1.0")
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    state.install(one, one_file)
    state.set_active("nav", False)
    state.install(two, two_file)
    assert state.last_known_good == {}


def test_in_flight_work_and_settled_orders(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    a, file = _assignment(tmp_path, "1.0")
    other, _ = _assignment(tmp_path, "1.0", rollout="r-other")
    assert state.reached(a) is None
    state.mark(a, "VERIFIED", file=file)
    assert state.reached(a) == "VERIFIED"
    assert state.reached(other) is None  # same bundle, another rollout: not this work
    state.settle(a)
    assert state.is_settled(a)
    assert state.in_flight("nav") is None
    revert = common_pb2.FeatureAssignment()
    revert.CopyFrom(a)
    revert.revert = True
    assert not state.is_settled(revert)
    assert settled_key(a) != settled_key(revert)
    assert state.abandon("nav") is False


def test_reached_at_least_follows_the_install_steps() -> None:
    assert reached_at_least("VERIFIED", "DOWNLOADED")
    assert reached_at_least("VERIFIED", "VERIFIED")
    assert not reached_at_least("VERIFIED", "INSTALLED")
    assert not reached_at_least(None, "NOTIFIED")


def test_a_kept_bundle_is_checked_against_its_digest(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    a, file = _assignment(tmp_path, "1.0")
    bundle = state.install(a, file)
    assert bundle.intact()
    data = file.read_bytes()
    file.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert not bundle.intact()
    file.write_bytes(data + b"x")
    assert not bundle.intact()
    file.write_bytes(data[:-1])
    assert not bundle.intact()
    file.unlink()
    assert not bundle.intact()


def test_prune_keeps_installed_fallback_and_in_flight_files(tmp_path: Path) -> None:
    state = InstalledFeatures.load(None)
    one, one_file = _assignment(tmp_path, "1.0")
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    three, three_file = _assignment(tmp_path, "3.0", rollout="r-3")
    stray = tmp_path / "downloads" / "stray"
    stray.write_bytes(b"left over")
    state.install(one, one_file)
    state.install(two, two_file)
    state.settle(two)
    state.mark(three, "VERIFIED", file=three_file)

    removed = state.prune(tmp_path / "downloads")

    assert removed == [stray]
    assert {p.name for p in (tmp_path / "downloads").iterdir()} == {
        "nav-1.0",
        "nav-2.0",
        "nav-3.0",
    }


@pytest.mark.parametrize(
    ("assigned", "running"), [("1.0", "2.0"), ("2.0", "2.0"), ("2.0.0", "2"), ("1.9", "1.10")]
)
def test_an_assignment_not_newer_than_what_runs_is_refused(assigned: str, running: str) -> None:
    a = common_pb2.FeatureAssignment(feature="nav", version=assigned)
    with pytest.raises(VerificationError, match="not newer") as err:
        check_not_downgrade(a, running)
    assert err.value.reason == "ROLLBACK_REFUSED"


def test_a_newer_version_is_allowed_and_garbage_is_invalid() -> None:
    check_not_downgrade(common_pb2.FeatureAssignment(feature="nav", version="1.10"), "1.9")
    with pytest.raises(VerificationError) as err:
        check_not_downgrade(common_pb2.FeatureAssignment(feature="nav", version="v2"), "1.0")
    assert err.value.reason == "METADATA_INVALID"


def test_saving_deletes_the_files_let_go_and_only_those(tmp_path: Path) -> None:
    state = InstalledFeatures.load(tmp_path / STATE_FILE)
    one, one_file = _assignment(tmp_path, "1.0")
    two, two_file = _assignment(tmp_path, "2.0", rollout="r-2")
    three, three_file = _assignment(tmp_path, "3.0", rollout="r-3")
    state.install(one, one_file)
    state.install(two, two_file)
    state.save()
    state.install(three, three_file)  # 1.0 is no longer anybody's fallback
    assert one_file.exists()  # until the state that drops it is on disk
    state.save()
    assert not one_file.exists()
    assert two_file.exists() and three_file.exists()
    state.revert_to_last_known_good("nav")
    state.save()
    assert not three_file.exists()
    assert two_file.exists()
