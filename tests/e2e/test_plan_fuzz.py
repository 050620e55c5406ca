"""Invariant: no plan document, however odd, leaves a rollout that cannot be read.

Hypothesis writes plan documents (YAML or JSON) from a grammar that mixes valid
values, values at and past every bound, bare numbers, wrong types and junk, and
sends each through the real `CreateRollout` of a real server (SQLite, and
PostgreSQL). Each call succeeds or is refused precisely, never INTERNAL; some
accepted rollouts are started and stopped. Afterwards every rollout the
database holds is returned by GetRollout, ListRollouts, the rollout report and
the feature report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from ota.client import Client
from ota.devstack import DevStack
from ota.domain.plan import METRICS
from ota.store.database import open_database
from ota.v1 import fleet_pb2, report_pb2, rollout_pb2
from tests.broker_harness import private_broker
from tests.conftest import endpoint, fresh_postgres_database
from tests.e2e.scenario import publish

pytestmark = pytest.mark.e2e

DEVICES = [f"car-{i:02d}" for i in range(12)]
PRECISE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
HUGE = [2**31, 2**32, 5_000_000_000, 2**63, 10**30, -1]


@dataclass
class Server:
    stack: DevStack
    client: Client
    database_url: str


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("plan-fuzz")
    with ExitStack() as cleanup:
        database_url = f"sqlite:///{tmp / 'ota.db'}"
        if request.param == "postgresql":
            admin_url = os.environ.get("OTA_TEST_DATABASE_URL", "")
            if not admin_url:
                pytest.skip("OTA_TEST_DATABASE_URL is not set (CI sets it)")
            database_url = cleanup.enter_context(fresh_postgres_database(admin_url))
        broker = cleanup.enter_context(private_broker(tmp / "broker"))
        stack = DevStack.start(tmp / "stack", broker=endpoint(broker), database_url=database_url)
        cleanup.callback(stack.stop)
        client = Client.connect(stack.server, stack.admin_token)
        cleanup.callback(client.close)
        client.fleet.RegisterDevices(
            fleet_pb2.RegisterDevicesRequest(
                devices=[
                    fleet_pb2.DeviceRegistration(
                        device_id=d, model="ev6", region="eu", firmware="4.2.0"
                    )
                    for d in DEVICES
                ]
            ),
            metadata=client.metadata,
        )
        publish(client, stack, tmp, "1.0.0")
        yield Server(stack, client, database_url)


# -- a grammar of plan documents ----------------------------------------------------------
# A valid plan, then up to three of its fields replaced by values at or past a bound, bare
# numbers, wrong types or junk: so both accepted and refused plans are common.


def _written(ppm: int, form: int) -> Any:
    if form == 0:
        return f"{Decimal(ppm) / 10_000}%"
    return f"{ppm}ppm" if form == 1 else {"ppm": ppm}


forms = st.integers(0, 2)
share = st.builds(_written, st.integers(1, 1_000_000), forms)
duration = st.one_of(
    st.sampled_from([0, 90, "30s", "15m", "2h", "365d", 31_536_000]),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 300), st.sampled_from(["s", "m", "h", "d"])),
)
count = st.one_of(st.integers(0, 20), st.just(100_000_000))


@st.composite
def valid_plan(draw: st.DrawFn) -> dict[str, Any]:
    exposures = sorted(draw(st.lists(st.integers(1, 1_000_000), min_size=1, max_size=4)))
    stages = []
    for i, ppm in enumerate(exposures):
        stage: dict[str, Any] = {"exposure": _written(ppm, draw(forms))}
        for key, values in (
            ("min_soak", duration),
            ("deadline", duration),
            ("min_exposed", count),
            ("name", st.text(st.characters(categories=("L", "N")), max_size=10)),
        ):
            if draw(st.booleans()):
                stage[key] = draw(values)
        if i < len(exposures) - 1 and draw(st.booleans()):
            stage["advance"] = "approval"
        stages.append(stage)
    doc: dict[str, Any] = {"feature": "lane-assist", "version": "1.0.0", "stages": stages}
    if draw(st.booleans()):
        doc["holdout"] = _written(draw(st.integers(0, 500_000)), draw(forms))
    if draw(st.booleans()):
        doc["gates"] = [
            {
                "metric": draw(st.sampled_from(METRICS)),
                "max": _written(draw(st.integers(0, 1_000_000)), draw(forms)),
                "min_sample": draw(st.one_of(st.integers(1, 20), st.just(100_000_000))),
                "window": draw(duration),
                "breaches_to_trip": draw(st.integers(1, 1_000)),
                "action": draw(st.sampled_from(["pause", "hold", "rollback"])),
                "observe_only": draw(st.booleans()),
            }
            for _ in range(draw(st.integers(1, 3)))
        ]
    if draw(st.booleans()):
        doc["cohort"] = {
            "devices": draw(st.lists(st.sampled_from(DEVICES), min_size=1, max_size=3))
        }
    return doc


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=12),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
bad = st.one_of(
    st.sampled_from(HUGE),
    st.sampled_from([100_000_001, 31_536_001, "366d", "50000d", "1000000000000s", 0]),
    st.sampled_from(["0.00001%", "-5%", "nan%", "100.0001%", "1000001ppm", {"ppm": 2**40}]),
    st.integers(0, 1_000_000),  # a bare share
    st.sampled_from(["n" * 200, "[" * 40]),
    junk,
)
PLACES = [
    ("holdout",),
    ("stages", 0, "exposure"),
    ("stages", -1, "exposure"),
    ("stages", 0, "min_soak"),
    ("stages", 0, "deadline"),
    ("stages", -1, "min_exposed"),
    ("stages", 0, "name"),
    ("stages", 0, "advance"),
    ("gates", 0, "max"),
    ("gates", 0, "min_sample"),
    ("gates", 0, "window"),
    ("gates", 0, "breaches_to_trip"),
    ("gates", -1, "metric"),
    ("cohort", "devices"),
    ("approvers",),
    ("stages",),
]


def _mutate(doc: dict[str, Any], changes: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    for path, value in changes:
        node: Any = doc
        for step in path[:-1]:
            if isinstance(step, str):
                node = node.setdefault(step, [{}] if step in ("stages", "gates") else {})
            elif isinstance(node, list) and node:
                node = node[step]
            else:
                break
        else:
            if isinstance(node, dict):
                node[path[-1]] = value
    return doc


def _poison(*path: Any, value: Any) -> dict[str, Any]:
    """A small valid plan with one value that today's storage or wire cannot hold."""
    doc: dict[str, Any] = {
        "feature": "lane-assist",
        "version": "1.0.0",
        "stages": [{"exposure": "50%"}, {"exposure": "100%"}],
        "gates": [{"metric": "install_failure", "max": "5%"}],
    }
    return _mutate(doc, [(path, value)])


plan = st.builds(
    _mutate, valid_plan(), st.lists(st.tuples(st.sampled_from(PLACES), bad), max_size=3)
)


def _document(doc: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(doc, default=str)
    return yaml.safe_dump(doc, default_flow_style=True, allow_unicode=True)


# -- the invariant ------------------------------------------------------------------------


def _stored_rollouts(database_url: str) -> set[str]:
    engine = open_database(database_url)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(text("SELECT rollout_id FROM rollout"))}
    finally:
        engine.dispose()


def _listed(client: Client) -> set[str]:
    ids: set[str] = set()
    token = ""
    while True:
        page = client.rollouts.ListRollouts(
            rollout_pb2.ListRolloutsRequest(page_size=7, page_token=token),
            metadata=client.metadata,
        )
        ids.update(r.rollout_id for r in page.rollouts)
        token = page.next_page_token
        if not token:
            return ids


def _command(client: Client, name: str, rollout_id: str) -> None:
    for _ in range(50):
        try:
            getattr(client.rollouts, f"{name}Rollout")(
                rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id),
                metadata=client.metadata,
            )
            return
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ABORTED:
                continue  # the engine's tick changed the rollout first: read again, retry
            assert exc.code() in PRECISE, f"{name}: {exc.code()}: {exc.details()}"
            return


def test_no_plan_document_leaves_a_rollout_that_cannot_be_read(server: Server) -> None:
    client = server.client
    accepted: list[str] = []

    @settings(
        max_examples=50,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(doc=plan, as_json=st.booleans(), start=st.booleans())
    @example(doc=_poison("stages", 0, "min_soak", value="50000d"), as_json=False, start=True)
    @example(
        doc=_poison("stages", 0, "min_exposed", value=5_000_000_000), as_json=True, start=False
    )
    @example(doc=_poison("gates", 0, "min_sample", value=5_000_000_000), as_json=False, start=True)
    @example(doc=_poison("stages", 0, "deadline", value=2**32), as_json=True, start=False)
    @example(doc=_poison("stages", 0, "exposure", value=50), as_json=False, start=True)
    def create(doc: dict[str, Any], as_json: bool, start: bool) -> None:
        document = _document(doc, as_json)
        try:
            created = client.rollouts.CreateRollout(
                rollout_pb2.CreateRolloutRequest(plan_document=document),
                metadata=client.metadata,
            )
        except grpc.RpcError as exc:
            assert exc.code() in PRECISE, f"{exc.code()}: {exc.details()}\n{document}"
            assert exc.details() and "\n" not in exc.details()
            return
        accepted.append(created.rollout_id)
        if start:
            _command(client, "Start", created.rollout_id)
            _command(client, "Abort", created.rollout_id)

    create()
    stored = _stored_rollouts(server.database_url)
    assert set(accepted) <= stored
    assert _listed(client) == stored
    for rollout_id in stored:
        got = client.rollouts.GetRollout(
            rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
        )
        assert got.rollout_id == rollout_id
        report = client.reports.GetRolloutReport(
            report_pb2.GetRolloutReportRequest(rollout_id=rollout_id), metadata=client.metadata
        )
        assert report.rollout.rollout_id == rollout_id
    feature = client.reports.GetFeatureReport(
        report_pb2.GetFeatureReportRequest(feature="lane-assist"), metadata=client.metadata
    )
    assert {r.rollout_id for r in feature.rollouts} == stored


def test_the_documents_exercise_both_outcomes(tmp_path: Path) -> None:
    """The grammar reaches accepted plans and refusals, so the invariant is not vacuous."""
    from ota.domain.plan_document import parse_plan_document
    from ota.errors import InvalidArgument

    outcomes: set[str] = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(doc=plan, as_json=st.booleans())
    def parse(doc: dict[str, Any], as_json: bool) -> None:
        try:
            parse_plan_document(_document(doc, as_json))
            outcomes.add("accepted")
        except InvalidArgument:
            outcomes.add("refused")

    parse()
    assert outcomes == {"accepted", "refused"}
