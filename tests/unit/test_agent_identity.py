"""The agent's certificate on disk: replaced as a whole, and a swap cut short is finished."""

from __future__ import annotations

from pathlib import Path

from ota.agent.config import AgentConfig, parse_config
from ota.agent.identity import has_identity, save
from ota.device.enroll import Identity


def config(base: Path) -> AgentConfig:
    return parse_config(
        {
            "device_id": "car-1",
            "identity": "certificate",
            "device_server": "ota.example.com:50052",
            "server": "ota.example.com:50051",
            "broker": "mqtts://broker.example.com",
            "state_dir": "state",
            "trusted_root": "root.json",
            "model": "ev6",
            "firmware": "4.2.0",
        },
        base=base,
    )


def identity(n: int) -> Identity:
    return Identity("car-1", f"key {n}".encode(), f"cert {n}".encode(), b"ca")


def test_a_saved_identity_replaces_the_old_one_whole(tmp_path: Path) -> None:
    c = config(tmp_path)
    assert not has_identity(c)
    save(c, identity(1))
    save(c, identity(2))
    assert has_identity(c)
    loaded = Identity.load(c.identity_dir, "car-1")
    assert (loaded.key, loaded.certificate) == (b"key 2", b"cert 2")
    assert sorted(p.name for p in c.identity_dir.parent.iterdir()) == ["identity"]
    assert (c.identity_dir / "key.pem").stat().st_mode & 0o777 == 0o600


def test_a_complete_new_identity_left_by_a_power_cut_wins(tmp_path: Path) -> None:
    c = config(tmp_path)
    save(c, identity(1))
    identity(2).save(c.identity_dir.with_name("identity.new"))  # cut before the swap
    assert has_identity(c)
    assert Identity.load(c.identity_dir, "car-1").key == b"key 2"
    assert not c.identity_dir.with_name("identity.new").exists()


def test_a_half_written_new_identity_is_dropped_and_the_old_one_kept(tmp_path: Path) -> None:
    c = config(tmp_path)
    save(c, identity(1))
    fresh = c.identity_dir.with_name("identity.new")
    identity(2).save(fresh)
    (fresh / "cert.pem").unlink()
    assert has_identity(c)
    assert Identity.load(c.identity_dir, "car-1").key == b"key 1"
    assert not fresh.exists()


def test_an_old_identity_moved_aside_comes_back_when_nothing_replaced_it(tmp_path: Path) -> None:
    c = config(tmp_path)
    save(c, identity(1))
    c.identity_dir.rename(c.identity_dir.with_name("identity.old"))  # cut between renames
    assert has_identity(c)
    assert Identity.load(c.identity_dir, "car-1").key == b"key 1"
