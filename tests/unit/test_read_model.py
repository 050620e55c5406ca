"""GetRollout's read model: kept until changed or too old, never kept across a racing change."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ota.api import readmodel
from ota.api.readmodel import RolloutReadModel
from ota.errors import NotFound
from ota.v1 import rollout_pb2


class Database:
    """What the read model loads from: a state per rollout, and a count of reads."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {"r-1": "DRAFT", "r-2": "DRAFT"}
        self.reads = 0
        self.during_read: Callable[[], None] = lambda: None

    def load(self, rollout_id: str) -> rollout_pb2.Rollout:
        self.reads += 1
        if rollout_id not in self.states:
            raise NotFound(f"rollout {rollout_id!r} does not exist", field="rollout_id")
        message = rollout_pb2.Rollout(rollout_id=rollout_id, feature=self.states[rollout_id])
        self.during_read()
        return message


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _model(db: Database, clock: Clock, *, max_age: float = 5.0) -> RolloutReadModel:
    return RolloutReadModel(db.load, max_age=max_age, clock=clock)


def test_a_rollout_is_read_once_until_it_changes() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock)
    assert views.get("r-1").feature == "DRAFT"
    assert views.get("r-1").feature == "DRAFT"
    assert db.reads == 1

    db.states["r-1"] = "RUNNING"
    views.invalidate("r-1")
    assert views.get("r-1").feature == "RUNNING"
    assert db.reads == 2


def test_invalidating_one_rollout_keeps_the_others() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock)
    views.get("r-1")
    views.get("r-2")
    views.invalidate_many(["r-1"])
    views.get("r-1")
    views.get("r-2")
    assert db.reads == 3
    views.invalidate_all()
    views.get("r-2")
    assert db.reads == 4


def test_no_entry_is_served_older_than_the_max_age() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock, max_age=1.0)
    views.get("r-1")
    db.states["r-1"] = "RUNNING"  # a change nobody announced
    clock.now += 0.5
    assert views.get("r-1").feature == "DRAFT"
    clock.now += 0.5
    assert views.get("r-1").feature == "RUNNING"


def test_a_max_age_of_zero_reads_every_time() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock, max_age=0.0)
    views.get("r-1")
    views.get("r-1")
    assert db.reads == 2


def test_a_load_that_raced_a_change_is_not_kept() -> None:
    """Read before the change committed, announced while reading: served once, not kept."""
    db, clock = Database(), Clock()
    views = _model(db, clock)

    def change_commits() -> None:
        db.states["r-1"] = "RUNNING"
        views.invalidate("r-1")

    db.during_read = change_commits
    assert views.get("r-1").feature == "DRAFT"  # what the read saw
    db.during_read = lambda: None
    assert views.get("r-1").feature == "RUNNING"

    db.during_read = views.invalidate_all
    views.get("r-2")
    db.during_read = lambda: None
    views.get("r-2")
    assert db.reads == 4  # the raced load of r-2 was not kept either


def test_a_missing_rollout_is_not_kept() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock)
    with pytest.raises(NotFound):
        views.get("r-9")
    db.states["r-9"] = "DRAFT"
    assert views.get("r-9").feature == "DRAFT"


def test_nothing_is_kept_while_changes_elsewhere_cannot_be_heard() -> None:
    db, clock = Database(), Clock()
    views = _model(db, clock)
    views.get("r-1")
    views.set_live(False)  # the listen connection is lost: what was kept is dropped
    assert not views.live
    db.states["r-1"] = "RUNNING"
    assert views.get("r-1").feature == "RUNNING"
    views.get("r-1")
    assert db.reads == 3

    views.set_live(True)
    views.get("r-1")
    views.get("r-1")
    assert db.reads == 4

    def connection_lost() -> None:
        views.set_live(False)

    views.invalidate("r-1")
    db.during_read = connection_lost
    views.get("r-1")
    db.during_read = lambda: None
    views.set_live(True)
    views.get("r-1")
    assert db.reads == 6  # the load that overlapped the loss was not kept


def test_memory_is_bounded_expired_entries_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readmodel, "MAX_ENTRIES", 3)
    db, clock = Database(), Clock()
    db.states |= {f"r-{i}": "DRAFT" for i in range(3, 10)}
    views = _model(db, clock, max_age=1.0)
    views.get("r-1")
    clock.now += 1.0  # r-1 expired
    views.get("r-2")
    views.get("r-3")
    views.get("r-4")  # full: r-1 goes, r-2 and r-3 stay
    reads = db.reads
    views.get("r-2")
    views.get("r-3")
    views.get("r-4")
    assert db.reads == reads
    views.get("r-5")  # full of fresh entries: all go
    views.get("r-2")
    assert db.reads == reads + 2
