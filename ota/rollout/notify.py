"""Building and signing each device's desired state from its feature assignments."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from sqlmodel import Session

from ota.store import desired
from ota.v1 import common_pb2


class DesiredStateSigner(Protocol):
    def sign(self, state: common_pb2.DesiredState) -> common_pb2.Envelope: ...


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


# Devices signed per round of statements: bounds the SQL parameter lists (SQLite
# allows 32 766) when a rollback or the kill switch reissues a whole fleet.
ISSUE_CHUNK = 2000


def issue_desired_states(
    session: Session,
    device_ids: Sequence[str],
    signer: DesiredStateSigner,
    *,
    now: datetime,
    ttl: timedelta,
) -> int:
    """Give each device a new generation of its desired state, signed, into the outbox.

    Batched: one UPDATE ... RETURNING for the generations, one read of the
    assignments and one upsert of the envelopes per chunk of devices.
    """
    issued = 0
    for start in range(0, len(device_ids), ISSUE_CHUNK):
        issued += _issue_chunk(session, device_ids[start : start + ISSUE_CHUNK], signer, now, ttl)
    return issued


def _issue_chunk(
    session: Session,
    device_ids: Sequence[str],
    signer: DesiredStateSigner,
    now: datetime,
    ttl: timedelta,
) -> int:
    generations = desired.next_generations(session, device_ids)
    features = desired.all_features(session, device_ids)
    issued_at, expires_at = _ts(now), _ts(now + ttl)
    envelopes: dict[str, tuple[int, bytes]] = {}
    for device_id, generation in generations.items():
        state = common_pb2.DesiredState(
            device_id=device_id,
            generation=generation,
            issued_at=issued_at,
            expires_at=expires_at,
            features=[
                common_pb2.FeatureAssignment(
                    feature=f.feature,
                    version=f.version,
                    target_path=f.target_path,
                    sha256=bytes.fromhex(f.sha256),
                    length=f.length,
                    active=f.active,
                    rollout_id=f.rollout_id,
                    revert=f.revert,
                )
                for f in features.get(device_id, [])
            ],
        )
        envelopes[device_id] = (generation, signer.sign(state).SerializeToString())
    desired.save_envelopes(session, envelopes, now)
    return len(envelopes)
