"""Every number of an adoption report once, as (section, key, value).

The CSV is exactly this list; the terminal table and the HTML page print the
same values under the same names, so a spreadsheet, a script and a person
read the same figures.
"""

from __future__ import annotations

from ota.v1 import report_pb2, rollout_pb2

Figure = tuple[str, str, str]


def pct(ppm: int) -> str:
    return f"{ppm / 10_000:.1f}%"


def secs(value: float) -> str:
    return f"{value:.2f}"


def rollout_state(value: int) -> str:
    return rollout_pb2.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_")  # type: ignore[arg-type]


def header(report: report_pb2.RolloutReport) -> list[Figure]:
    r = report.rollout
    fresh = report.data_time.ToDatetime().isoformat() if report.data_time.seconds else ""
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
    for key in ("eligible", "target_exposed", "exposed", "events_ingested"):
        out.append(("exposure", key, str(getattr(report, key))))
    out.append(("exposure", "applied", str(report.exposure_gap.applied)))
    out += [("gap", c.key, str(c.count)) for c in report.exposure_gap.reasons]
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
        for key in ("exposed", "installed", "active", "failed"):
            out.append((f"{c.dimension}:{c.value}", key, str(getattr(c, key))))
    for lat in report.latencies:
        out.append((f"time_to_{lat.name}", "devices", str(lat.devices)))
        for p in ("p50", "p90", "p99"):
            out.append((f"time_to_{lat.name}", f"{p}_seconds", secs(getattr(lat, f"{p}_seconds"))))
    h = report.health
    for group in (h.exposed, h.control) if h.HasField("control") else (h.exposed,):
        for key in ("devices", "samples", "crashes", "feature_errors"):
            out.append((f"health_{group.name}", key, str(getattr(group, key))))
        out.append((f"health_{group.name}", "unhealthy", pct(group.unhealthy_ppm)))
    s = report.stragglers
    out.append(("stragglers", "unreachable", str(s.unreachable)))
    out.append(("stragglers", "reachable_not_applied", str(s.reachable_not_applied)))
    out.append(("stragglers", "waiting_for_control_plane", str(s.waiting_for_control_plane)))
    out += [("last_seen", c.key, str(c.count)) for c in s.last_seen]
    for point in report.adoption_curve:
        when = point.time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
        for key in ("active", "installed", "failed", "reverted"):
            out.append((f"curve:{when}", key, str(getattr(point, key))))
    return out


def feature_figures(report: report_pb2.FeatureReport) -> list[Figure]:
    out: list[Figure] = [("feature", "name", report.feature)]
    out += [("devices_now", v.version, str(v.devices_now)) for v in report.versions]
    for v in report.versions:
        for p in v.points:
            when = p.time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
            out.append((f"version:{v.version}", when, str(p.devices)))
    for r in report.rollouts:
        out.append(("rollout", r.rollout_id, f"{r.version} {rollout_state(r.state)}"))
    return out
