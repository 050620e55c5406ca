"""Human labels for the machine keys of the figures.

The CSV and JSON keep the machine keys (`not_yet_notified`, `INSTALL_FAILED`,
`p50_seconds`); the table, the HTML file and the dashboard show these labels.
"""

from __future__ import annotations

_LABELS = {
    # exposure and where the exposed devices are
    "eligible": "eligible devices",
    "holdout": "holdout (never exposed)",
    "target_exposed": "target for this stage",
    "exposed": "exposed",
    "applied": "applied (running it)",
    "reverted": "installed, then reverted",
    "events_ingested": "events stored",
    "not_yet_notified": "not notified yet",
    "in_progress": "in progress",
    "failed": "failed",
    "offline": "offline, not done",
    "rounding": "rounding (per-device hashing)",
    # funnel steps
    "TARGETED": "exposed",
    "NOTIFIED": "notified",
    "DOWNLOADED": "downloaded",
    "VERIFIED": "verified",
    "INSTALLED": "installed",
    "ACTIVE": "active",
    "USED": "used",
    # device states
    "DOWNLOADING": "downloading",
    "INSTALLING": "installing",
    "FAILED": "failed",
    "ROLLED_BACK": "rolled back",
    "DEACTIVATED": "switched off",
    # latencies, health, stragglers
    "install": "exposure to installed",
    "first_use": "exposure to active",
    "devices": "devices",
    "p50_seconds": "median (s)",
    "p90_seconds": "p90 (s)",
    "p99_seconds": "p99 (s)",
    "samples": "health samples",
    "crashes": "crashes",
    "feature_errors": "feature errors",
    "unhealthy": "unhealthy samples",
    "samples_used": "samples reporting use",
    "uses": "uses reported",
    "used_share": "share of samples reporting use",
    "holdout_used_share": "holdout samples reporting use",
    "holdout_devices": "holdout devices",
    "holdout_used": "holdout devices that used it",
    "device_use_share": "share of exposed devices that used it",
    "holdout_device_use_share": "share of holdout devices that used it",
    "unreachable": "offline",
    "reachable_not_applied": "online, not applied",
    # outcome
    "state": "state",
    "action": "action",
    "actor": "by",
    "stage": "stage",
    "time": "when",
    "reason": "cause",
}

_ROLLOUT_STATES = {
    "DRAFT": "draft",
    "RUNNING": "running",
    "PAUSED": "paused",
    "COMPLETED": "completed",
    "ABORTED": "aborted",
    "ROLLED_BACK": "rolled back",
    "KILLED": "killed",
}


def label(key: str) -> str:
    """What a person reads for a machine key: `INSTALL_FAILED` is "install failed"."""
    known = _LABELS.get(key)
    if known is not None:
        return known
    if key.isupper() or "_" in key:
        return key.replace("_", " ").lower()
    return key


def rollout_state_label(state: str) -> str:
    return _ROLLOUT_STATES.get(state, state.lower())


def segment(section: str) -> str:
    """`model:ev9` as "model ev9"."""
    dimension, _, value = section.partition(":")
    return f"{dimension} {value}" if value else section
