"""CredentialChecks: device secrets checked against reads shared by concurrent calls."""

from __future__ import annotations

import threading
from collections.abc import Collection

import pytest

from ota.api.credentials import CredentialChecks
from ota.store.fleet import hash_secret


class _Devices:
    def __init__(self) -> None:
        self.digests = {"car-1": hash_secret("s1"), "car-2": hash_secret("s2")}
        self.reads: list[set[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def read(self, device_ids: Collection[str]) -> dict[str, str]:
        self.entered.set()
        assert self.release.wait(timeout=30)
        self.reads.append(set(device_ids))
        return {d: self.digests[d] for d in device_ids if d in self.digests}


def test_right_secret_passes_and_anything_else_fails() -> None:
    devices = _Devices()
    checks = CredentialChecks(devices.read)
    assert checks.check("car-1", "s1")
    assert not checks.check("car-1", "s2")
    assert not checks.check("car-9", "s1")
    del devices.digests["car-2"]  # revoked: the read leaves it out
    assert not checks.check("car-2", "s2")
    assert len(devices.reads) == 4


def test_a_failed_read_fails_its_checks_and_the_next_one_reads_again() -> None:
    devices = _Devices()
    calls = 0

    def flaky(device_ids: Collection[str]) -> dict[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")
        return devices.read(device_ids)

    checks = CredentialChecks(flaky)
    with pytest.raises(ConnectionError):
        checks.check("car-1", "s1")
    assert checks.check("car-1", "s1")


def test_checks_arriving_during_a_read_wait_for_a_later_one_and_share_it() -> None:
    devices = _Devices()
    devices.release.clear()
    checks = CredentialChecks(devices.read)
    results: dict[str, bool] = {}
    first = threading.Thread(target=lambda: results.update(a=checks.check("car-1", "s1")))
    first.start()
    assert devices.entered.wait(timeout=30)
    # Revoked while the first read runs: checks from now on must see it.
    del devices.digests["car-2"]
    later = [
        threading.Thread(target=lambda n=n: results.update({f"b{n}": checks.check("car-2", "s2")}))
        for n in range(4)
    ]
    for t in later:
        t.start()
    devices.release.set()
    for t in [first, *later]:
        t.join(timeout=30)
    assert results == {"a": True, "b0": False, "b1": False, "b2": False, "b3": False}
    assert 2 <= len(devices.reads) <= 5
    assert devices.reads[0] == {"car-1"}
