"""Adoption per label in SQL equals the same count made device by device in Python.

The grouped query of `ota.store.segments` (labels read from the device's JSON
column) against SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from ota.store import fleet, segments
from ota.store.database import migrate, open_database
from ota.store.models import FeatureUsageRow, RolloutDeviceRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 1, 1, tzinfo=UTC)
STATES = ("TARGETED", "DOWNLOADING", "INSTALLED", "ACTIVE", "FAILED", "ROLLED_BACK")


def _labels(i: int) -> dict[str, str]:
    return {
        "ring": ("beta", "prod")[i % 4 == 0],
        **({"vip": "yes"} if i % 7 == 0 else {}),
        **({"site.name": ("a-1", "b:2")[i % 2]} if i % 5 == 1 else {}),
    }


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    db = open_database(database_url)
    migrate(db)
    yield Store(db)
    db.dispose()


def test_usage_by_label_equals_a_count_per_device(store: Store) -> None:
    regs = [fleet.Registration(f"d{i:03d}", "ev6", "eu", "4.2.0", _labels(i)) for i in range(90)]
    # Exposed: d000-d059 (state by index); used: every third exposed device; the
    # holdout users are d060-d069; d070-d089 are neither. Another rollout's rows
    # must not count.
    exposed = range(60)
    used = [i for i in exposed if i % 3 == 0]
    holdout_used = range(60, 70)
    with store.transaction() as session:
        fleet.register_devices(session, regs, NOW)
        for rollout in ("r1", "r2"):
            for i in exposed if rollout == "r1" else range(80, 90):
                session.add(
                    RolloutDeviceRow(
                        rollout_id=rollout,
                        device_id=f"d{i:03d}",
                        model="ev6",
                        region="eu",
                        stage=0,
                        state=STATES[i % len(STATES)],
                        exposed_at=NOW,
                        updated_at=NOW,
                    )
                )
        for i in used:
            session.add(FeatureUsageRow(rollout_id="r1", device_id=f"d{i:03d}", holdout=False))
        for i in holdout_used:
            session.add(FeatureUsageRow(rollout_id="r1", device_id=f"d{i:03d}", holdout=True))
        session.add(FeatureUsageRow(rollout_id="r2", device_id="d085", holdout=False))

    expected: dict[str, Counter[str]] = {}
    for i in range(90):
        for k, v in _labels(i).items():
            c = expected.setdefault(f"{k}={v}", Counter())
            if i in exposed:
                c["exposed"] += 1
                c["applied"] += STATES[i % len(STATES)] in ("INSTALLED", "ACTIVE")
                c["used"] += i in used
            c["holdout_used"] += i in holdout_used
    with store.transaction() as session:
        got = {
            row.label: Counter(
                exposed=row.exposed,
                applied=row.applied,
                used=row.used,
                holdout_used=row.holdout_used,
            )
            for row in segments.usage_by_label(session, "r1")
        }
    want = {k: +c for k, c in expected.items() if +c}
    assert {k: +c for k, c in got.items()} == want
    assert want["ring=beta"]["used"] > 0 and want["site.name=b:2"]["holdout_used"] > 0
    with store.transaction() as session:
        assert segments.usage_by_label(session, "nope") == []
