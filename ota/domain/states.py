"""The device state machine of one rollout (PROTOCOL §5), as names and ranks.

States are stored and sent by name (the enum names of `ota.v1.DeviceState`).
Progress is a rank: a late event with a lower rank never moves a device back.
Terminal outcomes (FAILED, ROLLED_BACK, DEACTIVATED) are not progress steps.
"""

from __future__ import annotations

PROGRESS = (
    "TARGETED",
    "NOTIFIED",
    "DOWNLOADING",
    "DOWNLOADED",
    "VERIFIED",
    "INSTALLING",
    "INSTALLED",
    "ACTIVE",
)
OUTCOMES = ("FAILED", "ROLLED_BACK", "DEACTIVATED")
ALL_STATES = PROGRESS + OUTCOMES
RANK = {name: i for i, name in enumerate(PROGRESS)}

# A device in one of these states runs (or has reverted) what the rollout gave it.
# A later refusal naming the rollout -- a forged or replayed desired state, say --
# is a failure reason, not a lost install: the device keeps its state.
SETTLED = ("INSTALLED", "ACTIVE", "ROLLED_BACK", "DEACTIVATED")

# The funnel a product manager reads: each step counts devices that got at least that far.
FUNNEL = ("TARGETED", "NOTIFIED", "DOWNLOADED", "VERIFIED", "INSTALLED", "ACTIVE")

FAILURE_REASONS = (
    "SIGNATURE_INVALID",
    "HASH_MISMATCH",
    "LENGTH_MISMATCH",
    "METADATA_EXPIRED",
    "ROLLBACK_REFUSED",
    "WRONG_DEVICE",
    "INCOMPATIBLE",
    "DOWNLOAD_FAILED",
    "INSTALL_FAILED",
    "CLOCK_INVALID",
    "METADATA_INVALID",
    "CONTROL_PLANE_UNREACHABLE",
)

# Rollout states (`ota.v1.RolloutState` without its prefix).
DRAFT, RUNNING, PAUSED, COMPLETED, ABORTED, ROLLED_BACK, KILLED = (
    "DRAFT",
    "RUNNING",
    "PAUSED",
    "COMPLETED",
    "ABORTED",
    "ROLLED_BACK",
    "KILLED",  # the kill switch: the feature deactivated on every device it exposed
)
# A DRAFT that was deleted: kept for its audit log and its request_id, shown to nobody else.
DELETED = "DELETED"
ROLLOUT_ACTIVE = (RUNNING, PAUSED)
ROLLOUT_FINAL = (COMPLETED, ABORTED, ROLLED_BACK, KILLED)
