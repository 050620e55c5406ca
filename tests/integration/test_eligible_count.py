"""The eligible count read in SQL equals the device-by-device classification."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlmodel import Session

from ota.rollout.exposure import eligible_count, eligible_devices
from ota.store import bundles, fleet
from ota.store.database import migrate, open_database
from ota.store.models import BundleRow, RolloutRow
from ota.store.session import Store

pytestmark = pytest.mark.integration
NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    db = open_database(database_url)
    migrate(db)
    store = Store(db)
    regs = [
        fleet.Registration(
            f"d{i:03d}",
            ("ev6", "ev9", "niro")[i % 3],
            ("eu", "us")[i % 2],
            ("3.9", "4.0", "4.2.1", "10.0", "not-a-version")[i % 5],
            {"ring": ("beta", "prod")[i % 4 == 0], **({"vip": "yes"} if i % 7 == 0 else {})},
        )
        for i in range(120)
    ]
    with store.transaction() as session:
        fleet.register_devices(session, regs, NOW)
    with store.transaction() as session:
        for device_id in ("d005", "d011", "d042"):
            fleet.revoke(session, device_id)
    yield store
    db.dispose()


def _bundle(session: Session, models: list[str], min_firmware: str) -> BundleRow:
    version = f"1.{len(models)}.{len(min_firmware)}"
    bundles.add_bundle(
        session,
        feature="f",
        version=version,
        target_path=f"features/f/{version}.bundle",
        sha256="00" * 32,
        length=10,
        models=models,
        min_firmware=min_firmware,
        signer_keyids=[],
        request_id=None,
        now=NOW,
    )
    return bundles.get_bundle(session, bundles.bundle_name("f", version))


SELECTORS = [
    "",
    'model = "ev6"',
    'model in (ev6, niro) and region != "us"',
    'region not in (us) and labels.ring = "beta"',
    'firmware >= "4.0"',
    "firmware in (4.0, 10.0)",
    'labels.vip != "yes"',
    'device_id in (d001, d002, d005, d009) and model != "ev9"',
    'device_id not in (d000, d003) and labels.ring = "prod"',
    'model = "none"',
]


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize(
    ("models", "min_firmware"), [([], ""), (["ev6", "niro"], ""), ([], "4.1"), (["ev9"], "4.0")]
)
def test_eligible_count_equals_the_devices_eligible_one_by_one(
    store: Store, selector: str, models: list[str], min_firmware: str
) -> None:
    with store.transaction() as session:
        bundle = _bundle(session, models, min_firmware)
        rollout = RolloutRow.model_construct(selector=selector)
        expected = len(eligible_devices(session, rollout, bundle))
        assert eligible_count(session, rollout, bundle) == expected
