"""Tables of the control plane. Times are UTC; SQLite returns them naive."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, LargeBinary, UniqueConstraint
from sqlmodel import Field, SQLModel

# A device's event sequence is a 64-bit counter (it survives reboots, and firmware
# may seed it from a clock). SQLite's INTEGER is already 64-bit; PostgreSQL needs BIGINT.
SEQ = BigInteger().with_variant(Integer(), "sqlite")


class DeviceRow(SQLModel, table=True):
    __tablename__ = "device"

    device_id: str = Field(primary_key=True, max_length=128)
    model: str = Field(index=True, max_length=64)
    region: str = Field(index=True, max_length=64)
    firmware: str = Field(max_length=32)
    labels_json: str = "{}"
    secret_sha256: str = Field(max_length=64)
    revoked: bool = False
    created_at: datetime
    last_seen_at: datetime | None = None
    online: bool = False
    # Highest desired-state generation issued; strictly increasing.
    generation: int = 0
    # "password" (secret_sha256) or "certificate" (enrollment, then cert_serial).
    identity: str = Field(default="password", max_length=16)
    # The one certificate the device may use (hex serial); any other is refused.
    cert_serial: str = Field(default="", max_length=40)
    cert_not_after: datetime | None = None
    # A one-time enrollment token's digest, until used or expired.
    enroll_token_sha256: str = Field(default="", max_length=64)
    enroll_expires_at: datetime | None = None


class RevokedCertificateRow(SQLModel, table=True):
    """A device certificate no longer honoured: the device was revoked or renewed.

    Kept until the certificate would have expired anyway; the CRL lists these.
    """

    __tablename__ = "revoked_certificate"

    serial: str = Field(primary_key=True, max_length=40)
    device_id: str = Field(index=True, max_length=128)
    revoked_at: datetime
    not_after: datetime
    # "revoked" (the device was) or "superseded" (a renewal replaced it).
    reason: str = Field(max_length=16)


class DeviceFeatureRow(SQLModel, table=True):
    """The bundle a device should run for one feature, and the one before it."""

    __tablename__ = "device_feature"

    device_id: str = Field(primary_key=True, max_length=128)
    feature: str = Field(primary_key=True, max_length=64)
    version: str
    target_path: str
    sha256: str = Field(max_length=64)
    length: int
    active: bool = True
    rollout_id: str = Field(max_length=32)
    revert: bool = False
    # The assignment this one replaced: where a rollback returns to.
    prior_version: str | None = None
    prior_target_path: str | None = None
    prior_sha256: str | None = None
    prior_length: int | None = None


class DesiredStateRow(SQLModel, table=True):
    """The signed desired state of a device: an outbox until published."""

    __tablename__ = "desired_state"

    device_id: str = Field(primary_key=True, max_length=128)
    generation: int
    envelope: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    issued_at: datetime = Field(index=True)
    published_generation: int = Field(default=0, index=True)


class BundleRow(SQLModel, table=True):
    __tablename__ = "bundle"

    name: str = Field(primary_key=True, max_length=200)
    feature: str = Field(index=True, max_length=64)
    version: str = Field(max_length=32)
    target_path: str = Field(unique=True)
    sha256: str = Field(max_length=64)
    length: int
    models_json: str = "[]"
    min_firmware: str = ""
    signer_keyids_json: str = "[]"
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    created_at: datetime


class PendingBundleRow(SQLModel, table=True):
    """A publication signed by fewer release keys than the threshold: invisible to devices.

    Its bytes are already in the blob store; its targets metadata, with the
    signatures so far, waits here until `SignBundle` completes it.
    """

    __tablename__ = "pending_bundle"

    name: str = Field(primary_key=True, max_length=200)
    feature: str = Field(index=True, max_length=64)
    version: str = Field(max_length=32)
    target_path: str = Field(unique=True)
    sha256: str = Field(max_length=64)
    length: int
    models_json: str = "[]"
    min_firmware: str = ""
    # The targets version this publication becomes; stale once the current one reaches it.
    targets_version: int
    signed_targets: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    signer_keyids_json: str = "[]"
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    # Bumped on every added signature: the guard of conditional updates.
    revision: int = 1
    created_at: datetime
    updated_at: datetime


class TufMetadataRow(SQLModel, table=True):
    __tablename__ = "tuf_metadata"

    role: str = Field(primary_key=True, max_length=32)
    version: int = Field(primary_key=True)
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class RolloutRow(SQLModel, table=True):
    __tablename__ = "rollout"

    rollout_id: str = Field(primary_key=True, max_length=32)
    feature: str = Field(index=True, max_length=64)
    version: str = Field(max_length=32)
    bundle_name: str
    selector: str = ""
    # The plan (ota.domain.plan.RolloutPlan) as two JSON texts: its stages, and the rest.
    stages_json: str
    gate_json: str
    # Bumped by every accepted `edit`; version 1 is the plan the rollout was created with.
    plan_version: int = 1
    # What a RUNNING rollout is doing at its stage: exposing, soaking, awaiting_approval,
    # held (a gate said stay) or deferred (outside its maintenance windows).
    phase: str = Field(default="", max_length=32)
    # Per gate: consecutive breaches and the sample they were judged on (breaches_to_trip).
    gate_state: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(index=True, max_length=16)
    current_stage: int = -1
    stage_started_at: datetime | None = None
    # Eligible devices (selector matches, bundle compatible, holdout included) as of the
    # engine's last tick; None until the engine has counted them (see
    # `ota.rollout.exposure.reported_eligible`).
    eligible: int | None = None
    # Set by `promote`: the current stage's soak is skipped.
    promoted: bool = False
    salt_hex: str = Field(max_length=64)
    state_reason: str = ""
    request_id: str | None = Field(default=None, unique=True, max_length=128)
    request_hash: str = ""
    # Bumped on every change; the etag, and the guard of conditional updates.
    revision: int = 1
    created_at: datetime
    updated_at: datetime


class RolloutDeviceRow(SQLModel, table=True):
    """One device exposed by one rollout, and how far it got."""

    __tablename__ = "rollout_device"
    __table_args__ = (Index("ix_rollout_device_state", "rollout_id", "state"),)

    rollout_id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(primary_key=True, max_length=128)
    model: str = Field(max_length=64)
    region: str = Field(max_length=64)
    stage: int
    state: str = Field(max_length=16)
    reason: str = ""
    furthest_rank: int = 0
    last_seq: int = Field(default=0, sa_type=SEQ)
    exposed_at: datetime
    updated_at: datetime
    # When the device first reached each step (from the event's device time, else
    # arrival): time to install, time to first use and step times in reports.
    notified_at: datetime | None = None
    downloaded_at: datetime | None = None
    verified_at: datetime | None = None
    installed_at: datetime | None = None
    active_at: datetime | None = None


class DeviceEventRow(SQLModel, table=True):
    __tablename__ = "device_event"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_device_event_seq"),
        Index("ix_device_event_rollout", "rollout_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=128)
    seq: int = Field(sa_type=SEQ)
    rollout_id: str = Field(default="", max_length=32)
    feature: str = ""
    version: str = ""
    state: str = Field(max_length=16)
    error_code: str = ""
    detail: str = ""
    bundle_sha256: str = ""
    device_time: datetime | None = None
    received_at: datetime


class RolloutAuditRow(SQLModel, table=True):
    """Every command and automatic decision, with who, why and what changed."""

    __tablename__ = "rollout_audit"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: str = Field(index=True, max_length=32)
    time: datetime
    actor: str
    action: str
    from_state: str
    to_state: str
    stage: int
    reason: str = ""
    # What changed: {"field": [before, after]}, or the plan of a create / edit.
    diff: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # The caller's network address (gRPC peer); empty for the engine's own decisions.
    address: str = Field(default="", max_length=128)


class IngestDropRow(SQLModel, table=True):
    """Counted drops of device messages, by reason (malformed, mismatched, ...)."""

    __tablename__ = "ingest_drop"

    reason: str = Field(primary_key=True, max_length=64)
    count: int = 0


class AdoptionStatRow(SQLModel, table=True):
    """An incrementally maintained adoption aggregate (written by ingest, read by reports).

    `metric` says what `value` counts: `reached` (devices that first got to step
    `key`, in time `bucket`), `state` (devices now in state `key`, among those
    that reported), `failed` (devices whose failure reason is `key`),
    `step_time` / `latency` (devices whose duration falls in log bucket `bucket`
    for step `key`), `health` (sums of health sample fields `key`).
    """

    __tablename__ = "adoption_stat"

    rollout_id: str = Field(primary_key=True, max_length=32)
    metric: str = Field(primary_key=True, max_length=16)
    key: str = Field(primary_key=True, max_length=32)
    stage: int = Field(primary_key=True)
    model: str = Field(primary_key=True, max_length=64)
    region: str = Field(primary_key=True, max_length=64)
    firmware: str = Field(primary_key=True, max_length=32)
    bucket: int = Field(primary_key=True)
    value: int = 0


class FeatureVersionStatRow(SQLModel, table=True):
    """Net change, per time bucket, in the devices running each version of a feature."""

    __tablename__ = "feature_version_stat"

    feature: str = Field(primary_key=True, max_length=64)
    version: str = Field(primary_key=True, max_length=32)
    bucket: int = Field(primary_key=True)
    value: int = 0


class DeviceVersionRow(SQLModel, table=True):
    """The version of a feature a device last reported running (active or reverted to)."""

    __tablename__ = "device_version"

    device_id: str = Field(primary_key=True, max_length=128)
    feature: str = Field(primary_key=True, max_length=64)
    version: str = Field(max_length=32)


class ApiTokenRow(SQLModel, table=True):
    """An operator's API token: only its SHA-256 digest is kept."""

    __tablename__ = "api_token"

    token_id: str = Field(primary_key=True, max_length=32)
    token_sha256: str = Field(unique=True, max_length=64)
    display_name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    creator: str = Field(default="", max_length=128)
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None
    # None: never expires.
    expires_at: datetime | None = None


class LeaseRow(SQLModel, table=True):
    """A lease among control-plane replicas: who does the work that must run once.

    `token` grows by one on every change of hands; the holder's writes check it
    (fencing), so a holder that lost the lease cannot write after a new one took it.
    """

    __tablename__ = "lease"

    name: str = Field(primary_key=True, max_length=64)
    holder: str = Field(default="", max_length=128)
    token: int = Field(default=0, sa_type=SEQ)
    acquired_at: datetime | None = None
    renewed_at: datetime | None = None
    expires_at: datetime | None = None


class WebhookRow(SQLModel, table=True):
    """An endpoint that receives events; its secret signs every delivery."""

    __tablename__ = "webhook"

    webhook_id: str = Field(primary_key=True, max_length=32)
    url: str = Field(max_length=2000)
    # "whsec_" + base64 of the HMAC key: kept as is, since signing needs it.
    secret: str = Field(max_length=128)
    # Event types (JSON list); empty = every event.
    event_types_json: str = "[]"
    feature: str = Field(default="", max_length=64)
    rollout_id: str = Field(default="", max_length=32)
    description: str = Field(default="", max_length=200)
    creator: str = Field(default="", max_length=128)
    created_at: datetime


class WebhookEventRow(SQLModel, table=True):
    """One event, written in the transaction of the change it announces.

    `body` is the exact JSON sent: every retry carries the same bytes.
    """

    __tablename__ = "webhook_event"

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=40)
    type: str = Field(max_length=40)
    ordering_key: str = Field(max_length=220)
    body: str
    created_at: datetime


class WebhookDeliveryRow(SQLModel, table=True):
    """The outbox: one event to one endpoint, until delivered or parked as dead."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        Index("ix_webhook_delivery_state", "state", "id"),
        Index("ix_webhook_delivery_webhook", "webhook_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: str = Field(max_length=32)
    event_id: int
    # Copied from the event: the worker orders by it without a join.
    ordering_key: str = Field(max_length=220)
    state: str = Field(default="pending", max_length=16)
    attempts: int = 0
    next_attempt_at: datetime
    last_attempt_at: datetime | None = None
    last_status: int = 0
    last_error: str = Field(default="", max_length=500)
    delivered_at: datetime | None = None
    created_at: datetime


class AuditEntryRow(SQLModel, table=True):
    """Who did what to an object other than a rollout (those keep `rollout_audit`), when,
    from where: bundles, keys, tokens, devices, webhooks."""

    __tablename__ = "audit_entry"
    __table_args__ = (
        Index("ix_audit_entry_time", "time"),
        Index("ix_audit_entry_object", "object_type", "object_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    time: datetime
    actor: str = Field(max_length=128)
    address: str = Field(default="", max_length=128)
    object_type: str = Field(max_length=16)
    object_id: str = Field(max_length=200)
    action: str = Field(max_length=32)
    reason: str = ""
    detail: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class FeatureUsageRow(SQLModel, table=True):
    """A device that reported using a rollout's feature: counted once, on its first use."""

    __tablename__ = "feature_usage"

    rollout_id: str = Field(primary_key=True, max_length=32)
    device_id: str = Field(primary_key=True, max_length=128)
    # In the rollout's holdout (using the version it already ran), not exposed.
    holdout: bool = False


class ControlAccountRow(SQLModel, table=True):
    """A broker username a control plane connects as; its namespace is no device's.

    Every replica records its own at start, so a replica registering devices
    knows the names of the others (`ota.domain.accounts`).
    """

    __tablename__ = "control_account"

    username: str = Field(primary_key=True, max_length=128)
    recorded_at: datetime
