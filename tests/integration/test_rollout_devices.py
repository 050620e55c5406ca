"""A rollout's devices by state, paged by device id, with each one's last detail, on SQLite
and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from ota.store import rollouts
from ota.store.database import migrate, open_database
from ota.store.models import DeviceEventRow, RolloutDeviceRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    db = open_database(database_url)
    migrate(db)
    store = Store(db)
    with store.transaction() as session:
        for i in range(7):
            state = "FAILED" if i % 3 == 0 else "ACTIVE"
            for rollout_id in ("r-a", "r-b"):
                session.add(
                    RolloutDeviceRow(
                        rollout_id=rollout_id,
                        device_id=f"car-{i}",
                        model="ev9",
                        region="eu",
                        stage=0,
                        state=state,
                        reason="INSTALL_FAILED" if state == "FAILED" else "",
                        exposed_at=NOW,
                        updated_at=NOW + timedelta(minutes=i),
                    )
                )
            session.add_all(
                DeviceEventRow(
                    device_id=f"car-{i}",
                    seq=seq,
                    rollout_id="r-a",
                    state="FAILED" if seq == 2 and state == "FAILED" else "NOTIFIED",
                    detail=f"car-{i} event {seq}" if seq else "",
                    received_at=NOW,
                )
                for seq in range(3)
            )
    yield store
    db.dispose()


def test_devices_of_one_rollout_by_state_paged_by_id(store: Store) -> None:
    with store.transaction() as session:
        first, total = rollouts.rollout_devices(session, "r-a", "FAILED", after="", limit=2)
        rest, _ = rollouts.rollout_devices(
            session, "r-a", "FAILED", after=first[-1].device_id, limit=2
        )
        everyone, all_total = rollouts.rollout_devices(session, "r-a", "", after="", limit=100)
        details = rollouts.last_details(session, "r-a", [r.device_id for r in first])
    assert [r.device_id for r in first + rest] == ["car-0", "car-3", "car-6"] and total == 3
    assert all(r.rollout_id == "r-a" and r.reason == "INSTALL_FAILED" for r in first + rest)
    assert all_total == 7 and [r.device_id for r in everyone] == [f"car-{i}" for i in range(7)]
    # The last event that said something, per device; none from another rollout.
    assert details == {"car-0": "car-0 event 2", "car-3": "car-3 event 2"}
