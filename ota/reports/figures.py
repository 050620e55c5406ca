"""Every number of an adoption report once, as (section, key, value).

The CSV is exactly this list; the terminal table and the HTML page print the
same values under the same names, so a spreadsheet, a script and a person
read the same figures.
"""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from ota.v1 import report_pb2, rollout_pb2

Figure = tuple[str, str, str]

# The labels a report lists one by one (the most devices first); the rest are summed
# under OTHER_LABELS (real labels are `key=value`, so the name cannot clash).
MAX_LABELS = 50
OTHER_LABELS = "other"


def pct(ppm: int) -> str:
    return f"{ppm / 10_000:.1f}%"


def secs(value: float) -> str:
    return f"{value:.2f}"


def rollout_state(value: int) -> str:
    return rollout_pb2.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_")  # type: ignore[arg-type]


def when(stamp: timestamp_pb2.Timestamp) -> str:
    """A time to the second, in UTC, as the figures carry it ("" when unset)."""
    if not stamp.seconds:
        return ""
    # time.gmtime, not ToDatetime(): a report formats hundreds of curve times.
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp.seconds))


def short_keyid(keyid: str) -> str:
    """A key id as shown on screen: its first 12 hex digits (JSON keeps the whole)."""
    return keyid[:12]


def header(report: report_pb2.RolloutReport) -> list[Figure]:
    r = report.rollout
    fresh = when(report.data_time)
    return [
        ("header", "rollout_id", r.rollout_id),
        ("header", "feature", r.feature),
        ("header", "version", r.version),
        ("header", "signer_keyids", " ".join(report.signer_keyids)),
        ("header", "plan_version", report.plan_version),
        ("header", "state", rollout_state(r.state)),
        ("header", "stage", str(r.current_stage + 1) if r.current_stage >= 0 else ""),
        ("header", "stages", str(len(r.stages))),
        ("header", "data_time", fresh),
    ]


def figures(report: report_pb2.RolloutReport) -> list[Figure]:
    """Every figure of the report, once, in a fixed order."""
    out: list[Figure] = []
    if report.HasField("outcome"):
        o = report.outcome
        out += [
            ("outcome", "state", rollout_state(o.to_state)),
            ("outcome", "action", o.action),
            ("outcome", "actor", o.actor),
            ("outcome", "stage", str(o.stage + 1) if o.stage >= 0 else ""),
            ("outcome", "time", when(o.time)),
            ("outcome", "reason", o.reason),
        ]
    gap = report.exposure_gap
    out.append(("exposure", "eligible", str(report.eligible)))
    out.append(("exposure", "holdout", str(gap.holdout)))
    for key in ("target_exposed", "exposed"):
        out.append(("exposure", key, str(getattr(report, key))))
    out.append(("exposure", "applied", str(gap.applied)))
    out.append(("exposure", "reverted", str(gap.reverted)))
    out.append(("exposure", "events_ingested", str(report.events_ingested)))
    out += [("gap", c.key, str(c.count)) for c in gap.reasons]
    for step in report.funnel:
        out.append(("funnel", step.step, str(step.devices)))
        out.append(("funnel_conversion", step.step, pct(step.conversion_ppm)))
        out.append(("funnel_median_seconds", step.step, secs(step.median_step_seconds)))
    for sf in report.stage_funnels:
        out += [(f"stage_{sf.stage + 1}_funnel", s.step, str(s.devices)) for s in sf.steps]
    out += [("state", c.key, str(c.count)) for c in report.current_states]
    out += [("failure", c.key, str(c.count)) for c in report.failures_by_reason]
    out += [
        (f"failure:{f.reason}", f"{f.dimension}:{f.value}", str(f.devices))
        for f in report.failures_by_cohort
    ]
    for c in report.cohorts:
        for key in COHORT_KEYS:
            out.append((f"{c.dimension}:{c.value}", key, str(getattr(c, key))))
        out.append(
            (f"{c.dimension}:{c.value}", "used_share", pct(share(c.samples_used, c.samples)))
        )
        out.append(
            (
                f"{c.dimension}:{c.value}",
                "holdout_used_share",
                pct(share(c.holdout_samples_used, c.holdout_samples)),
            )
        )
    for seg in report.labels:
        section = f"label:{seg.label}"
        out += [(section, key, str(getattr(seg, key))) for key in LABEL_KEYS]
        out.append((section, "device_use_share", pct(share(seg.used, seg.exposed))))
        out.append(
            (section, "holdout_device_use_share", pct(share(seg.holdout_used, seg.holdout_devices)))
        )
    for lat in report.latencies:
        out.append((f"time_to_{lat.name}", "devices", str(lat.devices)))
        for p in ("p50", "p90", "p99"):
            out.append((f"time_to_{lat.name}", f"{p}_seconds", secs(getattr(lat, f"{p}_seconds"))))
    h = report.health
    for group in (h.exposed, h.control) if h.HasField("control") else (h.exposed,):
        for key in ("devices", "samples", "crashes", "feature_errors", "samples_used", "uses"):
            out.append((f"health_{group.name}", key, str(getattr(group, key))))
        out.append((f"health_{group.name}", "unhealthy", pct(group.unhealthy_ppm)))
        out.append(
            (f"health_{group.name}", "used_share", pct(share(group.samples_used, group.samples)))
        )
    s = report.stragglers
    out.append(("stragglers", "unreachable", str(s.unreachable)))
    out.append(("stragglers", "reachable_not_applied", str(s.reachable_not_applied)))
    out.append(("stragglers", "waiting_for_control_plane", str(s.waiting_for_control_plane)))
    out += [("last_seen", c.key, str(c.count)) for c in s.last_seen]
    out.append(("curve", "resolution_seconds", str(report.curve_resolution_seconds)))
    for point in report.adoption_curve:
        for key in ("active", "installed", "failed", "reverted", "used"):
            out.append((f"curve:{when(point.time)}", key, str(getattr(point, key))))
    for u in report.usage_curve:
        for key in ("samples", "samples_used", "holdout_samples", "holdout_samples_used"):
            out.append((f"usage:{when(u.time)}", key, str(getattr(u, key))))
    return out


COHORT_KEYS = (
    "exposed",
    "installed",
    "active",
    "used",
    "failed",
    "samples",
    "samples_used",
    "holdout_devices_used",
    "holdout_samples",
    "holdout_samples_used",
)

LABEL_KEYS = ("exposed", "applied", "used", "holdout_devices", "holdout_used")


def share(part: int, whole: int) -> int:
    """part / whole in ppm (0 without a whole)."""
    return part * 1_000_000 // whole if whole else 0


def feature_figures(report: report_pb2.FeatureReport) -> list[Figure]:
    out: list[Figure] = [("feature", "name", report.feature)]
    out += [("devices_now", v.version, str(v.devices_now)) for v in report.versions]
    for v in report.versions:
        for p in v.points:
            out.append((f"version:{v.version}", when(p.time), str(p.devices)))
    for r in report.rollouts:
        out.append(("rollout", r.rollout_id, f"{r.version} {rollout_state(r.state)}"))
    return out
