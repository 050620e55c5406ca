"""ServedMetadata: versioned files from memory; the latest always checked against the store."""

from __future__ import annotations

import threading

from ota.trust.served import ServedMetadata


def _doc(role: str, version: int) -> bytes:
    return f"{role} v{version}".encode()


class _Source:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], bytes] = {}
        self.reads: list[tuple[str, int | None]] = []
        self.version_reads = 0

    def put(self, role: str, version: int) -> None:
        self.rows[(role, version)] = _doc(role, version)

    def get_metadata(self, role: str, version: int | None) -> bytes | None:
        self.reads.append((role, version))
        if version is None:
            versions = [v for r, v in self.rows if r == role]
            return self.rows[(role, max(versions))] if versions else None
        return self.rows.get((role, version))

    def latest_versions(self) -> dict[str, int]:
        self.version_reads += 1
        latest: dict[str, int] = {}
        for role, version in self.rows:
            latest[role] = max(version, latest.get(role, 0))
        return latest


def _filled() -> _Source:
    source = _Source()
    for role in ("root", "targets", "snapshot", "timestamp"):
        source.put(role, 1)
    source.put("targets", 2)
    return source


def test_versioned_files_are_read_once_then_served_from_memory() -> None:
    source = _filled()
    served = ServedMetadata(source)
    for _ in range(3):
        assert served.get("targets", 1) == _doc("targets", 1)
        assert served.get("targets", 2) == _doc("targets", 2)
    assert source.reads == [("targets", 1), ("targets", 2)]
    assert source.version_reads == 0


def test_the_latest_is_checked_each_time_and_its_bytes_read_once() -> None:
    source = _filled()
    served = ServedMetadata(source)
    for _ in range(3):
        assert served.get("timestamp", None) == _doc("timestamp", 1)
    assert source.reads == [("timestamp", 1)]
    assert source.version_reads == 3
    # Another replica re-signs: the very next call serves it.
    source.put("timestamp", 2)
    assert served.get("timestamp", None) == _doc("timestamp", 2)
    assert served.get("timestamp", 1) == _doc("timestamp", 1)


def test_a_root_past_the_newest_is_none_without_reading_its_bytes() -> None:
    source = _filled()
    served = ServedMetadata(source)
    assert served.get("root", 2) is None
    assert source.reads == []
    source.put("root", 2)
    assert served.get("root", 2) == _doc("root", 2)
    assert served.get("root", None) == _doc("root", 2)


def test_missing_versions_and_roles_are_none() -> None:
    source = _filled()
    served = ServedMetadata(source)
    assert served.get("snapshot", 7) is None
    assert served.get("snapshot", 7) is None
    assert served.get("mirrors", None) is None
    assert ("snapshot", 7) in source.reads


def test_the_versioned_cache_is_bounded() -> None:
    source = _filled()
    for v in range(2, 10):
        source.put("snapshot", v)
    served = ServedMetadata(source, max_versioned=3)
    for v in range(1, 10):
        served.get("snapshot", v)
    source.reads.clear()
    assert served.get("snapshot", 9) == _doc("snapshot", 9)
    assert served.get("snapshot", 1) == _doc("snapshot", 1)
    assert source.reads == [("snapshot", 1)]


class _SlowSource(_Source):
    """Holds the first version read until released, to pile requests up behind it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def latest_versions(self) -> dict[str, int]:
        self.entered.set()
        assert self.release.wait(timeout=30)
        return super().latest_versions()


def test_a_request_arriving_during_a_read_waits_for_a_later_one() -> None:
    source = _SlowSource()
    for role in ("root", "targets", "snapshot", "timestamp"):
        source.put(role, 1)
    served = ServedMetadata(source)
    first: list[bytes | None] = []
    later: list[bytes | None] = []
    t1 = threading.Thread(target=lambda: first.append(served.get("timestamp", None)))
    t1.start()
    assert source.entered.wait(timeout=30)
    # Stored while the first read runs, which may or may not see it; requests made
    # from now on must.
    source.put("timestamp", 2)
    others = [
        threading.Thread(target=lambda: later.append(served.get("timestamp", None)))
        for _ in range(5)
    ]
    for t in others:
        t.start()
    source.release.set()
    for t in [t1, *others]:
        t.join(timeout=30)
    assert later == [_doc("timestamp", 2)] * 5
    assert len(first) == 1
    assert 2 <= source.version_reads <= 6
