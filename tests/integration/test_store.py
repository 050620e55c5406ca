"""The store against real databases: a SQLite file, and PostgreSQL when OTA_TEST_DATABASE_URL is set."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from securesystemslib.signer import CryptoSigner
from sqlmodel import Session, SQLModel

from ota.domain import states
from ota.domain.selector import Selector
from ota.errors import Aborted
from ota.rollout.notify import issue_desired_states
from ota.store import bundles, desired, fleet, rollouts
from ota.store.database import migrate, open_database
from ota.store.ingest import IncomingEvent, ingest_events
from ota.store.models import BundleRow, RolloutDeviceRow, RolloutRow
from ota.store.session import Store
from ota.trust.director import Director
from ota.v1 import common_pb2

pytestmark = pytest.mark.integration
NOW = datetime(2026, 5, 1, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    engine = open_database(database_url)
    migrate(engine)
    migrate(engine)  # idempotent
    yield Store(engine)
    engine.dispose()


def test_migrations_create_exactly_the_models(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def _rollout(store: Store) -> RolloutRow:
    with store.transaction() as session:
        fleet.register_devices(session, [fleet.Registration("d1", "ev6", "eu", "4.2", {})], NOW)
        row = RolloutRow(
            rollout_id="r-1",
            feature="f",
            version="1.0",
            bundle_name="bundles/f/1.0",
            stages_json="[]",
            gate_json="{}",
            state=states.RUNNING,
            salt_hex="00",
            created_at=NOW,
            updated_at=NOW,
        )
        session.add(row)
        session.flush()
        rollouts.expose(session, "r-1", [fleet.get_device(session, "d1")], 0, NOW)
        return row


def _event(seq: int, state: str) -> IncomingEvent:
    return IncomingEvent("d1", seq, "r-1", "f", "1.0", state, "", "", "", None)


def test_ingest_is_idempotent_and_never_moves_a_device_backwards(store: Store) -> None:
    _rollout(store)
    with store.transaction() as session:
        first = ingest_events(session, [_event(1, "NOTIFIED"), _event(3, "ACTIVE")], NOW)
    with store.transaction() as session:
        again = ingest_events(session, [_event(3, "ACTIVE"), _event(2, "DOWNLOADING")], NOW)
    assert (first.stored, first.duplicates) == (2, 0)
    assert (again.stored, again.duplicates) == (1, 1)
    with store.transaction() as session:
        assert rollouts.state_counts(session, "r-1") == {"ACTIVE": 1}


def test_a_refusal_after_install_is_a_reason_not_a_lost_install(store: Store) -> None:
    _rollout(store)
    refused = IncomingEvent("d1", 4, "r-1", "f", "1.0", "FAILED", "SIGNATURE_INVALID", "", "", None)
    with store.transaction() as session:
        ingest_events(session, [_event(3, "ACTIVE"), refused], NOW)
    with store.transaction() as session:
        assert rollouts.state_counts(session, "r-1") == {"ACTIVE": 1}
        row = session.get(RolloutDeviceRow, ("r-1", "d1"))
        assert row is not None and row.reason == "SIGNATURE_INVALID" and row.last_seq == 4


def test_unknown_devices_and_rollouts_are_dropped_not_stored(store: Store) -> None:
    _rollout(store)
    with store.transaction() as session:
        result = ingest_events(
            session,
            [
                IncomingEvent("ghost", 1, "r-1", "f", "1.0", "ACTIVE", "", "", "", None),
                IncomingEvent("d1", 1, "r-404", "f", "1.0", "ACTIVE", "", "", "", None),
            ],
            NOW,
        )
    assert result.stored == 0
    assert dict(result.dropped) == {"unknown_device": 1, "unknown_rollout": 1}


def test_a_transition_from_a_stale_read_is_refused(store: Store) -> None:
    stale = _rollout(store)
    with store.transaction() as session:
        fresh = rollouts.get_rollout(session, "r-1")
        rollouts.transition(
            session, fresh, to_state=states.PAUSED, actor="a", action="pause", reason="", now=NOW
        )
    with pytest.raises(Aborted), store.transaction() as session:
        rollouts.transition(
            session, stale, to_state=states.ABORTED, actor="b", action="abort", reason="", now=NOW
        )
    with store.transaction() as session:
        row = rollouts.get_rollout(session, "r-1")
        assert row.state == states.PAUSED
        assert [a.action for a in rollouts.audit_log(session, "r-1")] == ["pause"]


def _bundle(session: Session, version: str) -> BundleRow:
    return bundles.add_bundle(
        session,
        feature="f",
        version=version,
        target_path=f"features/f/{version}.bundle",
        sha256=version.replace(".", "").ljust(64, "0"),
        length=10,
        models=[],
        min_firmware="",
        signer_keyids=[],
        request_id=None,
        now=NOW,
    )


def test_desired_states_are_assigned_numbered_signed_and_marked_in_batches(store: Store) -> None:
    director = Director(CryptoSigner.generate_ed25519())
    ids = [f"d{i}" for i in range(5)]
    with store.transaction() as session:
        fleet.register_devices(
            session, [fleet.Registration(i, "ev6", "eu", "4.2", {}) for i in ids], NOW
        )
        first, second = _bundle(session, "1.0"), _bundle(session, "2.0")
    with store.transaction() as session:
        desired.assign(session, ids, first, "r-1")
        assert issue_desired_states(session, ids, director, now=NOW, ttl=timedelta(days=1)) == 5
    with store.transaction() as session:
        desired.mark_published(session, [(i, 1) for i in ids[:3]])
    with store.transaction() as session:
        assert sorted(r.device_id for r in desired.unpublished(session, 10)) == ids[3:]
        # A second rollout remembers the first one's bundle as the one to return to.
        desired.assign(session, ids[:2], second, "r-2")
        issue_desired_states(session, ids[:2], director, now=NOW, ttl=timedelta(days=1))
    with store.transaction() as session:
        rows = desired.features_of(session, ids, "f")
        assert {i: (r.version, r.prior_version, r.rollout_id) for i, r in rows.items()} == {
            "d0": ("2.0", "1.0", "r-2"),
            "d1": ("2.0", "1.0", "r-2"),
            "d2": ("1.0", None, "r-1"),
            "d3": ("1.0", None, "r-1"),
            "d4": ("1.0", None, "r-1"),
        }
        # A newer generation stays unpublished although an older one was acknowledged.
        desired.mark_published(session, [("d0", 1)])
        pending = {r.device_id: r.generation for r in desired.unpublished(session, 10)}
        assert pending == {"d0": 2, "d1": 2, "d3": 1, "d4": 1}
        envelope = common_pb2.Envelope.FromString(desired.get_envelope(session, "d0") or b"")
        state = common_pb2.DesiredState.FromString(envelope.payload)
        assert (state.generation, [f.version for f in state.features]) == (2, ["2.0"])


def test_presence_is_one_batch_and_the_last_report_of_a_device_wins(store: Store) -> None:
    later = NOW + timedelta(seconds=5)
    with store.transaction() as session:
        fleet.register_devices(
            session, [fleet.Registration(i, "ev6", "eu", "4.2", {}) for i in ("a", "b")], NOW
        )
    with store.transaction() as session:
        fleet.mark_seen(
            session,
            [("a", NOW, True), ("b", NOW, True), ("a", later, None), ("b", later, False)],
        )
        fleet.mark_seen(session, [("nobody", later, True)])  # unknown devices are ignored
    with store.transaction() as session:
        a, b = fleet.get_device(session, "a"), fleet.get_device(session, "b")
        assert (a.online, a.last_seen_at, b.online, b.last_seen_at) == (True, later, False, later)


def test_a_listing_leaves_revoked_devices_out_unless_asked(store: Store) -> None:
    with store.transaction() as session:
        fleet.register_devices(
            session, [fleet.Registration(i, "ev6", "eu", "4.2", {}) for i in ("a", "b")], NOW
        )
        fleet.revoke(session, "b", NOW)
    selector = Selector.parse("firmware >= 4.0")
    with store.transaction() as session:
        default, n_default = fleet.list_devices(session, selector, after="", limit=10)
        everyone, n_everyone = fleet.list_devices(
            session, selector, after="", limit=10, include_revoked=True
        )
        assert ([d.device_id for d in default], n_default) == (["a"], 1)
        assert [(d.device_id, d.revoked) for d in everyone] == [("a", False), ("b", True)]
        assert n_everyone == 2


def test_a_revoked_device_is_offline_whatever_it_last_reported(store: Store) -> None:
    with store.transaction() as session:
        fleet.register_devices(session, [fleet.Registration("a", "ev6", "eu", "4.2", {})], NOW)
        fleet.mark_seen(session, [("a", NOW, True)])
    with store.transaction() as session:
        assert fleet.revoke(session, "a", NOW).online is False
    with store.transaction() as session:
        # A report in flight when it was revoked does not bring it back.
        fleet.mark_seen(session, [("a", NOW + timedelta(seconds=1), True)])
    with store.transaction() as session:
        assert fleet.get_device(session, "a").online is False
