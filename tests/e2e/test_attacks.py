"""Every update attack of PROTOCOL §3, each through the whole real system.

Each test runs a private Mosquitto, the control plane on a real gRPC port over
SQLite, and 3 simulated devices (device_sim, one per model). The devices first
install lane-assist 1.0.0 through an honest rollout; then the attacker strikes
and the test checks that

- the device is unchanged: it runs what it ran and keeps the trusted metadata
  the attack targeted. When the attack is on the desired state itself it also
  accepted no new generation; when the desired state was genuine and the attack
  is on the bundle, the TUF metadata or the assignment, the device does accept
  that (newer, validly signed) generation and refuses what it asks;
- it sent a FAILED DeviceEvent with the right FailureReason (as stored by the
  control plane, and as the device recorded sending it);
- the rollout report counts that reason (`failures_by_reason`).

Attackers use real access: the broker (a user allowed to publish desired
states), or a stolen control plane: its disk, its database and its online keys
(snapshot, timestamp, director), never a release or root key.

| attack (PROTOCOL §3)            | test                                                  | reason            |
|-------------------------------|-------------------------------------------------------|-------------------|
| forged signature              | test_forged_desired_state_signature_is_refused        | SIGNATURE_INVALID |
|                               | test_forged_release_signature_is_refused              | SIGNATURE_INVALID |
| unknown key                   | test_trust.py::test_desired_state_signed_by_an_       | SIGNATURE_INVALID |
|                               |   unknown_key_is_refused_and_counted                  |                   |
|                               | test_trust.py::test_bundle_signed_by_an_unknown_      | (server refuses)  |
|                               |   release_key_is_refused_and_stays_invisible          |                   |
|                               | test_bundle_signed_by_an_unknown_key_is_refused_by_   | SIGNATURE_INVALID |
|                               |   devices                                             |                   |
| below threshold               | test_release_signatures_below_threshold_are_refused   | SIGNATURE_INVALID |
| duplicate signatures          | test_duplicate_release_signatures_do_not_meet_the_    | METADATA_INVALID  |
|                               |   threshold                                           |                   |
| tampered payload              | test_tampered_bundle_is_refused                       | HASH_MISMATCH     |
| truncated payload             | test_truncated_bundle_is_refused                      | LENGTH_MISMATCH   |
| endless payload               | test_endless_bundle_is_cut_off                        | LENGTH_MISMATCH   |
| replayed desired state        | test_replayed_desired_state_is_refused                | ROLLBACK_REFUSED  |
| replayed metadata             | test_replayed_timestamp_is_refused                    | ROLLBACK_REFUSED  |
| expired desired state         | test_expired_desired_state_is_refused                 | METADATA_EXPIRED  |
| expired metadata              | test_expired_timestamp_is_refused                     | METADATA_EXPIRED  |
| mix-and-match                 | test_mix_and_match_of_snapshot_and_targets_is_refused | HASH_MISMATCH     |
| downgrade                     | test_downgrade_is_refused                             | ROLLBACK_REFUSED  |
| desired state for another     | test_desired_state_for_another_device_is_refused      | WRONG_DEVICE      |
| device                        |                                                       |                   |
| bundle for another model      | test_bundle_for_another_model_is_refused              | INCOMPATIBLE      |
| root rotation, cross-signed   | test_root_cross_signed_by_old_and_new_keys_is_followed| (accepted)        |
| root rotation, self-signed    | test_root_signed_only_by_new_keys_is_refused          | SIGNATURE_INVALID |
| device clock far behind       | test_device_clock_far_behind_is_refused               | CLOCK_INVALID     |
| device clock far ahead        | test_device_clock_far_ahead_is_refused                | METADATA_EXPIRED  |
| another device's topics (ACL) | test_device_cannot_speak_for_or_listen_to_another_    | (broker refuses)  |
|                               |   device                                              |                   |
| joining the control plane's   | test_device_cannot_divert_what_the_control_plane_     | (SUBACK 0x87)     |
|   ingest group                |   receives                                            |                   |
| device token, operator method | test_api.py::test_callers_are_authenticated_and_      | PERMISSION_DENIED |
|                               |   devices_reach_only_their_own_state                  |                   |
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlmodel import select

from ota.clock import ManualClock
from ota.signing.keys import generate_key, load_signer
from ota.signing.release import target_path_for
from ota.signing.rootgen import RootChange, next_root
from ota.store.models import DeviceEventRow, DeviceRow
from ota.v1 import bundle_pb2, common_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.e2e.attack_tools import (
    FEATURE,
    Arena,
    arena,
    assert_unchanged,
    attack_broker,
    bundle_bytes,
    edit_signatures,
    forge,
    generation_of,
    kept_files,
    refusals,
    release_targets,
    smuggle_bundle,
    snapshots,
    tampered,
    trusted_metadata,
    trusted_version,
    utcnow,
)
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerHandle]:
    with attack_broker(tmp_path) as handle:
        yield handle


# -- the bundle bytes ------------------------------------------------------------------------


def test_tampered_bundle_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        blob = a.blob(a.publish("2.0.0"))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same length, one bit pattern changed
        blob.write_bytes(bytes(data))
        before, kept = snapshots(a), kept_files(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert kept_files(a) == kept  # no trace of the bad bytes
        assert refused == {"HASH_MISMATCH": 3}


def test_truncated_bundle_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        blob = a.blob(a.publish("2.0.0"))
        blob.write_bytes(blob.read_bytes()[:6_000])  # the stream ends early
        before, kept = snapshots(a), kept_files(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert kept_files(a) == kept
        assert refused == {"LENGTH_MISMATCH": 3}


def test_endless_bundle_is_cut_off(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        blob = a.blob(a.publish("2.0.0"))
        os.truncate(blob, 1024**3)  # the signed 10 kB, then a GiB more (a sparse file)
        before, kept = snapshots(a), kept_files(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert kept_files(a) == kept
        assert refused == {"LENGTH_MISMATCH": 3}


# -- the director's desired state --------------------------------------------------------


def test_forged_desired_state_signature_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        first = a.install("1.0.0")
        a.publish("2.0.0")  # signed by the release key, but nobody rolled it out
        victim = a.device("ev6")
        before = snapshots(a)

        def point_at_2_0_0(state: common_pb2.DesiredState) -> None:
            state.generation += 1
            feature = state.features[0]
            feature.version, feature.target_path = "2.0.0", target_path_for(FEATURE, "2.0.0")
            data = bundle_bytes("2.0.0")
            feature.sha256, feature.length = hashlib.sha256(data).digest(), len(data)

        # The genuine signature over the 1.0.0 state, on a payload naming 2.0.0.
        a.deliver(victim, tampered(a.envelope(victim), point_at_2_0_0))

        refused = refusals(a, first.rollout_id, 1)
        assert_unchanged(a, before)
        assert refused == {"SIGNATURE_INVALID": 1}


def test_desired_state_for_another_device_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        first = a.install("1.0.0")
        victim, other = a.device("ev6"), a.device("ev9")
        before = snapshots(a)

        a.deliver(victim, a.envelope(other))  # genuinely signed, for somebody else

        refused = refusals(a, first.rollout_id, 1)
        assert_unchanged(a, before)
        assert refused == {"WRONG_DEVICE": 1}


def test_replayed_desired_state_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        first = a.install("1.0.0")
        victim = a.device("ev6")
        old = a.envelope(victim)
        a.install("2.0.0")
        before = snapshots(a)
        assert generation_of(old) < before[victim.device_id].generation

        a.deliver(victim, old)  # the 1.0.0 state again: an attempt to downgrade by replay

        refused = refusals(a, first.rollout_id, 1)
        assert_unchanged(a, before)
        assert refused == {"ROLLBACK_REFUSED": 1}


def test_expired_desired_state_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # The control plane signs with the real director key, but its clock is 8 days
    # behind: its desired states (valid 7 days) have expired when they arrive, the
    # same as a genuine state an attacker held back until after it expired.
    clock = ManualClock(utcnow())
    with arena(tmp_path, broker, control_clock=clock) as a:
        a.install("1.0.0")
        a.publish("2.0.0")
        before = snapshots(a)
        clock.set(utcnow() - timedelta(days=8))

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before)
        assert refused == {"METADATA_EXPIRED": 3}


def test_bundle_for_another_model_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # The release engineer signs 2.0.0 for ev6 only. The (compromised) registry says
    # the niro device is an ev6, so the control plane assigns it 2.0.0.
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        victim = a.device("niro")
        a.register_as(victim, "ev6")
        a.publish("2.0.0", models=["ev6"])
        before = snapshots(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 1)
        assert_unchanged(a, before, devices=[victim], accepted_genuine_state=True)
        assert refused == {"INCOMPATIBLE": 1}
        assert a.device("ev6").installed[FEATURE].version == "2.0.0"
        assert a.device("ev9").installed[FEATURE].version == "1.0.0"  # not eligible


def test_downgrade_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # A rollout of an older version, not a signed revert: even the device's own
    # last-known-good 1.0.0 may come back only through a revert.
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        a.install("2.0.0")
        before = snapshots(a)

        rollout = a.roll_out("1.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"ROLLBACK_REFUSED": 3}


# -- the image repository's metadata (a stolen control plane) ---------------------------


def test_replayed_timestamp_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        a.publish("2.0.0")
        # The repository serves its first timestamp again, validly signed and unexpired.
        newest = a.latest_version("timestamp")
        a.overwrite_tuf_row("timestamp", newest, a.tuf_row("timestamp", 1))
        before = snapshots(a)
        trusted = trusted_metadata(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"ROLLBACK_REFUSED": 3}
        assert trusted_metadata(a) == trusted


def test_expired_timestamp_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # A frozen repository: the control plane's clock is 2 days behind, so the
    # timestamp it signs for 2.0.0 (valid 1 day) expired a day ago.
    clock = ManualClock(utcnow())
    with arena(tmp_path, broker, control_clock=clock) as a:
        a.install("1.0.0")
        clock.set(utcnow() - timedelta(days=2))
        a.publish("2.0.0")
        before = snapshots(a)
        trusted = trusted_metadata(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"METADATA_EXPIRED": 3}
        assert trusted_metadata(a) == trusted


def test_mix_and_match_of_snapshot_and_targets_is_refused(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        a.publish("2.0.0")
        # The new snapshot names targets v(n); the repository serves targets v(n-1) under it.
        newest = a.latest_version("targets")
        a.overwrite_tuf_row("targets", newest, a.tuf_row("targets", newest - 1))
        before = snapshots(a)
        trusted_targets = trusted_metadata(a, "targets.json")

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"HASH_MISMATCH": 3}
        assert trusted_metadata(a, "targets.json") == trusted_targets


def test_bundle_signed_by_an_unknown_key_is_refused_by_devices(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    # The control plane refuses such a bundle (test_trust.py); a thief bypasses it.
    impostor = tmp_path / "impostor.pem"
    generate_key(impostor)
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        smuggle_bundle(a, "2.0.0", release_targets(a, "2.0.0", [load_signer(impostor)]))
        before = snapshots(a)
        trusted_targets = trusted_metadata(a, "targets.json")

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert trusted_metadata(a, "targets.json") == trusted_targets
        assert refused == {"SIGNATURE_INVALID": 3}


def test_forged_release_signature_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # The release key's keyid, with signature bytes the thief made up.
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        release = [load_signer(k) for k in a.stack.keys.release_keys]
        smuggle_bundle(a, "2.0.0", edit_signatures(release_targets(a, "2.0.0", release), forge))
        before = snapshots(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"SIGNATURE_INVALID": 3}


def test_release_signatures_below_threshold_are_refused(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    with arena(tmp_path, broker, release_keys=2, release_threshold=2) as a:
        a.install("1.0.0")
        first_engineer = a.stack.keys.release_keys[:1]
        # Honestly, one signature of the two required leaves the bundle pending...
        pending = a.publish("2.0.0", keys=first_engineer)
        assert pending.state == bundle_pb2.BUNDLE_STATE_PENDING
        # ...until a thief serves its targets metadata (1 of 2 signatures) to devices.
        smuggle_bundle(a, "2.0.0", a.pending_targets("2.0.0"))
        before = snapshots(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert refused == {"SIGNATURE_INVALID": 3}


def test_duplicate_release_signatures_do_not_meet_the_threshold(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    with arena(tmp_path, broker, release_keys=2, release_threshold=2) as a:
        a.install("1.0.0")
        assert a.publish("2.0.0", keys=a.stack.keys.release_keys[:1]).state == (
            bundle_pb2.BUNDLE_STATE_PENDING
        )
        # The one signature listed twice, to pass for 2 of 2.
        twice = edit_signatures(a.pending_targets("2.0.0"), lambda sigs: sigs.extend(sigs))
        smuggle_bundle(a, "2.0.0", twice)
        before = snapshots(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        # python-tuf refuses a file listing a keyid twice before it counts signatures.
        assert refused == {"METADATA_INVALID": 3}


def test_root_signed_only_by_new_keys_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        a.publish("2.0.0")
        new_root = tmp_path / "new-root.pem"
        cross_signed = next_root(
            a.tuf_row("root"),
            RootChange(root_keys=[generate_key(new_root)]),
            [load_signer(a.stack.keys.root_key), load_signer(new_root)],
            expires=utcnow() + timedelta(days=365),
        )
        # The same root v2 without the old root key's signature: only its own keys vouch.
        old_keyid = load_signer(a.stack.keys.root_key).public_key.keyid
        self_signed = edit_signatures(
            cross_signed, lambda sigs: sigs.remove(next(s for s in sigs if s["keyid"] == old_keyid))
        )
        with pytest.raises(grpc.RpcError) as refused_by_server:
            a.client.bundles.RotateRoot(
                bundle_pb2.RotateRootRequest(new_root=self_signed), metadata=a.client.metadata
            )
        assert refused_by_server.value.code() == grpc.StatusCode.PERMISSION_DENIED
        a.metadata_store.put_metadata("root", 2, self_signed)  # a thief stores it anyway
        before = snapshots(a)

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before, accepted_genuine_state=True)
        assert all(trusted_version(a, d, "root") == 1 for d in a.devices)
        assert refused == {"SIGNATURE_INVALID": 3}


def test_root_cross_signed_by_old_and_new_keys_is_followed(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    # Rotate the root and the release key; devices must follow to accept the next bundle.
    with arena(tmp_path, broker) as a:
        a.install("1.0.0")
        old_release = a.stack.keys.release_key
        new_root, new_release = tmp_path / "new-root.pem", tmp_path / "new-release.pem"
        plan = a.client.plan_root_rotation(
            RootChange(
                root_keys=[generate_key(new_root)], release_keys=[generate_key(new_release)]
            ),
            root_keys=[a.stack.keys.root_key, new_root],
            release_keys=[new_release],
        )
        assert a.client.rotate_root(plan).root_version == 2
        with pytest.raises(grpc.RpcError) as retired:
            a.publish("2.0.0", keys=[old_release])
        assert retired.value.code() == grpc.StatusCode.PERMISSION_DENIED

        a.publish("2.0.0", keys=[new_release])
        rollout = a.roll_out("2.0.0")

        assert rollout.state == rollout_pb2.ROLLOUT_STATE_COMPLETED, rollout.state_reason
        assert all(d.installed[FEATURE].version == "2.0.0" for d in a.devices)
        assert all(trusted_version(a, d, "root") == 2 for d in a.devices)
        assert list(a.report(rollout.rollout_id).failures_by_reason) == []


# -- the device's clock ------------------------------------------------------------------


def test_device_clock_far_behind_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    clock = ManualClock(utcnow())
    with arena(tmp_path, broker, device_clock=clock) as a:
        a.install("1.0.0")  # every device now has a time floor
        a.publish("2.0.0")
        before = snapshots(a)
        clock.set(datetime(1970, 1, 1, tzinfo=UTC))  # a reset real-time clock

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before)
        assert refused == {"CLOCK_INVALID": 3}


def test_device_clock_far_ahead_is_refused(tmp_path: Path, broker: BrokerHandle) -> None:
    # A device cannot tell its clock is ahead from data being stale: it refuses as
    # expired, and its time floor (signed times only) does not follow its clock.
    clock = ManualClock(utcnow())
    with arena(tmp_path, broker, device_clock=clock) as a:
        a.install("1.0.0")
        a.publish("2.0.0")
        before = snapshots(a)
        clock.advance(timedelta(days=30))

        rollout = a.roll_out("2.0.0")

        refused = refusals(a, rollout.rollout_id, 3)
        assert_unchanged(a, before)
        assert refused == {"METADATA_EXPIRED": 3}


# -- the broker ---------------------------------------------------------------------------


def test_device_cannot_divert_what_the_control_plane_receives(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    """A stolen device secret joins no share of the control plane's events or state."""
    events_sent = 20
    with arena(tmp_path, broker, devices=1) as a:
        thief_secret = a.register("thief")
        honest_secret = a.register("honest")
        root = a.topics.root
        with (
            a.broker.client("thief", thief_secret) as thief,
            a.broker.client("honest", honest_secret) as honest,
        ):
            thief.connect_ok()
            # The control plane's own groups, any other group, wildcards, others' topics.
            for filter_ in (
                a.topics.shared_events(),
                a.topics.shared_state(),
                f"$share/thieves/{root}/devices/+/events",
                f"$share/x/{a.topics.desired('thief')}",
                f"{root}/devices/+/events",
                f"{root}/devices/+/state",
                f"{root}/devices/#",
                "#",
                a.topics.desired("honest"),
                a.topics.events("thief"),
                a.topics.state("thief"),
            ):
                assert thief.subscribe(filter_).value == 0x87, filter_
            assert thief.subscribe(a.topics.desired("thief")).value == 1

            honest.connect_ok()
            for seq in range(1, events_sent + 1):
                event = common_pb2.DeviceEvent(
                    device_id="honest", seq=seq, state=common_pb2.NOTIFIED
                )
                assert not honest.publish(
                    a.topics.events("honest"), event.SerializeToString()
                ).is_failure
            wait_for(
                lambda: stored_events(a, "honest") == events_sent,
                what=f"the control plane to store all {events_sent} events",
                timeout=60,
            )
            # Presence: each report flips the stored flag, so a lost one stalls the wait.
            for n in range(events_sent):
                online = n % 2 == 0
                state = common_pb2.ReportedState(device_id="honest", online=online)
                assert not honest.publish(
                    a.topics.state("honest"), state.SerializeToString()
                ).is_failure
                wait_for(
                    lambda online=online: stored_online(a, "honest") is online,
                    what=f"the control plane to record state report {n + 1}",
                    timeout=30,
                )
            assert thief.messages.empty()
        assert stored_events(a, "honest") == events_sent
        assert a.drops() == {}


def stored_events(a: Arena, device_id: str) -> int:
    with a.stack.control_plane.store.transaction() as session:
        return len(
            session.exec(select(DeviceEventRow).where(DeviceEventRow.device_id == device_id)).all()
        )


def stored_online(a: Arena, device_id: str) -> bool | None:
    with a.stack.control_plane.store.transaction() as session:
        row = session.get(DeviceRow, device_id)
        return None if row is None or row.last_seen_at is None else row.online


def test_device_cannot_speak_for_or_listen_to_another_device(
    tmp_path: Path, broker: BrokerHandle
) -> None:
    with arena(tmp_path, broker) as a:
        first = a.install("1.0.0")
        victim = a.device("ev6")
        # A genuine device, provisioned like any other, turned against the fleet.
        secret = a.register("intruder")
        forged = common_pb2.DeviceEvent(
            device_id=victim.device_id,
            seq=2**40,
            rollout_id=first.rollout_id,
            state=common_pb2.FAILED,
            error_code=common_pb2.INSTALL_FAILED,
        ).SerializeToString()
        with a.broker.client("intruder", secret) as intruder:
            intruder.connect_ok()
            # Publishing on the victim's topics: refused by the broker (0x87).
            for topic in (a.topics.events(victim.device_id), a.topics.state(victim.device_id)):
                assert intruder.publish(topic, forged).value == 0x87
            # On its own topic the broker takes it; the control plane drops the mismatch.
            assert not intruder.publish(a.topics.events("intruder"), forged).is_failure
            wait_for(
                lambda: a.drops().get("device_mismatch", 0) == 1,
                what="the control plane to drop the event naming another device",
            )
            # Reading the victim's desired state: refused at SUBSCRIBE (0x87).
            assert intruder.subscribe(a.topics.desired(victim.device_id)).value == 0x87
            assert intruder.subscribe(a.topics.desired("intruder")).value == 1
            a.deliver("intruder", b"marker", retain=False)
            received = intruder.messages_until(a.topics.desired("intruder"))
            assert [m.topic for m in received] == [a.topics.desired("intruder")]

        r = a.report(first.rollout_id)
        assert list(r.failures_by_reason) == []
        assert {c.key: c.count for c in r.current_states} == {"ACTIVE": 3}
