"""Eligibility in SQL equals the device-by-device classification in Python.

The Python selector matcher (`Selector.matches`, `compatible`) is the
reference; the SQL translation the engine and the API use must agree with it
on every selector, against SQLite and (when OTA_TEST_DATABASE_URL is set)
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import Session

from ota.domain.selector import Selector
from ota.rollout.exposure import compatible, eligibility, eligible_count
from ota.store import bundles, fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.models import BundleRow, DeviceRow, RolloutRow
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
            {
                "ring": ("beta", "prod")[i % 4 == 0],
                **({"vip": "yes"} if i % 7 == 0 else {}),
                **({"site.name": ("a-1", "b:2")[i % 2]} if i % 5 == 1 else {}),
            },
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
        expected = _eligible_one_by_one(session, rollout, bundle)
        assert eligible_count(session, rollout, bundle) == len(expected)
        unexposed = fleet.unexposed_devices(session, eligibility(rollout, bundle), "none")
        assert [d.device_id for d in unexposed] == expected


def _eligible_one_by_one(session: Session, rollout: RolloutRow, bundle: BundleRow) -> list[str]:
    """The reference: every device through the Python matcher."""
    selector = Selector.parse(rollout.selector)
    return [
        d.device_id
        for d in rollouts.fleet_devices(session)
        if not d.revoked and selector.matches(fleet.attributes(d)) and compatible(d, bundle)
    ]


_VALUES = {
    "model": ["ev6", "ev9", "niro", "none"],
    "region": ["eu", "us", "apac"],
    "device_id": ["d000", "d001", "d005", "d042", "d119", "x"],
    "labels.ring": ["beta", "prod", "none"],
    "labels.vip": ["yes", "no"],
    "labels.site.name": ["a-1", "b:2"],
    "labels.absent": ["x"],
    "firmware": ["3.9", "4.0", "4.2", "4.2.1", "10.0"],
}


@st.composite
def _terms(draw: st.DrawFn) -> str:
    attr = draw(st.sampled_from(sorted(_VALUES)))
    values = draw(st.lists(st.sampled_from(_VALUES[attr]), min_size=1, max_size=3, unique=True))
    ops = ["=", "!=", "in", "not in"] + ([">=", ">", "<=", "<"] if attr == "firmware" else [])
    op = draw(st.sampled_from(ops))
    if op in ("in", "not in"):
        return f"{attr} {op} ({', '.join(values)})"
    return f'{attr} {op} "{values[0]}"'


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(terms=st.lists(_terms(), max_size=3))
def test_the_sql_selection_agrees_with_the_python_matcher(store: Store, terms: list[str]) -> None:
    selector = " and ".join(terms)
    with store.transaction() as session:
        reference = [
            d.device_id
            for d in rollouts.fleet_devices(session)
            if not d.revoked and Selector.parse(selector).matches(fleet.attributes(d))
        ]
        selected = fleet.select_devices(session, Selector.parse(selector))
        assert [d.device_id for d in selected] == reference
        page, total = fleet.list_devices(session, Selector.parse(selector), after="d050", limit=7)
        assert total == len(reference)
        assert [d.device_id for d in page] == [i for i in reference if i > "d050"][:7]


def test_exposed_devices_are_not_read_again(store: Store) -> None:
    with store.transaction() as session:
        bundle = _bundle(session, [], "")
        admitted = eligibility(RolloutRow.model_construct(selector=""), bundle)
        first = fleet.unexposed_devices(session, admitted, "r1")
        rollouts.expose(session, "r1", first[:50], 0, NOW)
    with store.transaction() as session:
        rest = fleet.unexposed_devices(session, admitted, "r1")
        assert [d.device_id for d in rest] == [d.device_id for d in first[50:]]
        assert fleet.count_eligible(session, admitted) == len(first)
        assert isinstance(session.get(DeviceRow, first[0].device_id), DeviceRow)
