"""What a page shows of an adoption report: labelled rows of figures, and chart data.

Built from the same list of figures as the CSV (`ota.reports.figures`): each
number on a page is a `Cell` naming its (section, key), so the HTML file and
the dashboard carry `data-figure="section|key"` and show exactly the CSV's
value, under a human label. Both render it with the same Jinja2 template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ota.reports.figures import (
    MAX_LABELS,
    OTHER_LABELS,
    Figure,
    figures,
    header,
    rollout_state,
    short_keyid,
    when,
)
from ota.reports.labels import label, rollout_state_label, segment
from ota.v1 import report_pb2


@dataclass(frozen=True)
class Cell:
    figure: str  # "section|key"
    value: str


@dataclass(frozen=True)
class Row:
    label: str
    cells: list[Cell]
    bar_pct: float | None = None  # a bar under the row, in % of the largest
    tone: str = ""  # "bad", "muted", "" : how the row is drawn


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[Row]
    note: str = ""
    anchor: str = ""
    wide: bool = False


@dataclass(frozen=True)
class Outcome:
    state: str
    headline: str
    cells: list[tuple[str, Cell]]


@dataclass(frozen=True)
class AuditLine:
    number: int
    time: str
    actor: str
    action: str
    state: str
    reason: str


@dataclass
class ReportView:
    rollout_id: str
    feature: str
    version: str
    state: str
    state_label: str
    stage: str
    plan_version: str
    signers: list[tuple[str, str]]  # (short, full)
    data_time: Cell
    generated: str
    outcome: Outcome | None
    kpis: list[tuple[str, Cell]]
    funnel: list[Row]
    tables: list[Table] = field(default_factory=list)
    audit: list[AuditLine] = field(default_factory=list)
    charts: dict[str, Any] = field(default_factory=dict)

    @property
    def charts_json(self) -> str:
        # Safe inside <script type="application/json">: no "</" can close the element.
        return json.dumps(self.charts, separators=(",", ":")).replace("</", "<\\/")


_STOPPED = {
    "ROLLED_BACK": "Rolled back",
    "KILLED": "Killed",
    "ABORTED": "Aborted",
    "PAUSED": "Paused",
}


def build_view(report: report_pb2.RolloutReport) -> ReportView:
    head = {k: v for _, k, v in header(report)}
    all_figures = figures(report)
    by_key = {(s, k): v for s, k, v in all_figures}
    sections: dict[str, list[Figure]] = {}
    for f in all_figures:
        sections.setdefault(f[0], []).append(f)

    def cell(section: str, key: str) -> Cell:
        return Cell(f"{section}|{key}", by_key[(section, key)])

    state = head["state"]
    stage = f"{head['stage']} of {head['stages']}" if head["stage"] else "not started"
    view = ReportView(
        rollout_id=head["rollout_id"],
        feature=head["feature"],
        version=head["version"],
        state=state,
        state_label=rollout_state_label(state),
        stage=stage,
        plan_version=head["plan_version"] or "-",
        signers=[(short_keyid(k), k) for k in report.signer_keyids],
        data_time=Cell("header|data_time", head["data_time"]),
        generated=when(report.generated_time),
        outcome=_outcome(report, cell),
        kpis=[
            (label(k), cell("exposure", k))
            for k in ("eligible", "holdout", "exposed", "applied", "reverted")
        ]
        + ([("used", cell("funnel", "USED"))] if ("funnel", "USED") in by_key else []),
        funnel=_funnel_rows(report, cell),
    )
    partition = ("applied", "reverted", "failed", "in_progress", "not_yet_notified")
    exposed = max(report.exposed, 1)
    view.tables.append(
        Table(
            "Exposure",
            ["devices"],
            [Row(label(k), [cell("exposure", k)]) for k in ("eligible", "holdout")]
            + [Row(label("target_exposed"), [cell("exposure", "target_exposed")])]
            + [Row(label("exposed"), [cell("exposure", "exposed")])]
            + [
                Row(
                    "· " + label(k),
                    [c],
                    bar_pct=100 * int(c.value) / exposed,
                    tone="bad" if k == "failed" and int(c.value) else "",
                )
                for k in partition
                for c in [cell("exposure" if k in ("applied", "reverted") else "gap", k)]
            ]
            + [
                Row(label("offline"), [cell("gap", "offline")], tone="muted"),
                Row(label("rounding"), [cell("gap", "rounding")], tone="muted"),
                Row(label("events_ingested"), [cell("exposure", "events_ingested")], tone="muted"),
            ],
            note=(
                "The holdout is the control group: eligible, never exposed, never a gap. "
                "Exposed devices are split into applied, reverted, failed, in progress and "
                "not notified yet; offline counts those not done whose device is offline."
            ),
            anchor="exposure",
        )
    )
    view.tables.append(_stage_funnels(report, cell))
    view.tables.append(
        Table(
            "Current state",
            ["devices"],
            [Row(label(k), [cell("state", k)]) for _, k, _ in sections.get("state", [])],
            anchor="states",
        )
    )
    view.tables.append(_failures(report, cell, sections))
    view.tables.append(_segments(report, cell))
    view.tables.append(_labels(report, cell))
    view.tables.append(
        Table(
            "Time to install and to first use",
            ["devices", "median (s)", "p90 (s)", "p99 (s)"],
            [
                Row(
                    label(x.name),
                    [
                        cell(f"time_to_{x.name}", k)
                        for k in ("devices", "p50_seconds", "p90_seconds", "p99_seconds")
                    ],
                )
                for x in report.latencies
            ],
            anchor="latency",
        )
    )
    view.tables.append(_health(report, cell))
    view.tables.append(
        Table(
            "Stragglers",
            ["devices"],
            [Row(label(k), [cell("stragglers", k)]) for _, k, _ in sections.get("stragglers", [])]
            + [
                Row(f"last seen {k}", [cell("last_seen", k)])
                for _, k, _ in sections.get("last_seen", [])
            ],
            note="Exposed devices not done yet, offline or online.",
            anchor="stragglers",
        )
    )
    view.audit = [
        AuditLine(
            i + 1,
            when(e.time),
            e.actor,
            label(e.action),
            rollout_state_label(rollout_state(e.to_state)),
            e.reason,
        )
        for i, e in enumerate(report.timeline)
    ]
    view.charts = _charts(report)
    return view


def _outcome(report: report_pb2.RolloutReport, cell: Any) -> Outcome | None:
    if not report.HasField("outcome"):
        return None
    o = report.outcome
    state = rollout_state(o.to_state)
    by = "the gate" if o.actor == "engine" and o.action in ("rollback", "pause") else o.actor
    headline = f"{_STOPPED.get(state, state)} by {by} at stage {o.stage + 1}"
    keys = ("reason", "time", "actor", "action")
    return Outcome(state, headline, [(label(k), cell("outcome", k)) for k in keys])


def _funnel_rows(report: report_pb2.RolloutReport, cell: Any) -> list[Row]:
    top = max((s.devices for s in report.funnel), default=0) or 1
    return [
        Row(
            label(s.step),
            [
                cell("funnel", s.step),
                cell("funnel_conversion", s.step),
                cell("funnel_median_seconds", s.step),
            ],
            bar_pct=100 * s.devices / top,
        )
        for s in report.funnel
    ]


def _stage_funnels(report: report_pb2.RolloutReport, cell: Any) -> Table:
    steps = [s.step for s in report.funnel]
    return Table(
        "Funnel per stage",
        [label(s) for s in steps],
        [
            Row(
                f"stage {sf.stage + 1} ({sf.ppm / 10_000:g}%)",
                [cell(f"stage_{sf.stage + 1}_funnel", s.step) for s in sf.steps],
            )
            for sf in report.stage_funnels
        ],
        anchor="stage-funnel",
        wide=True,
    )


def _failures(
    report: report_pb2.RolloutReport, cell: Any, sections: dict[str, list[Figure]]
) -> Table:
    top = max((c.count for c in report.failures_by_reason), default=0) or 1
    rows = [
        Row(label(c.key), [cell("failure", c.key)], bar_pct=100 * c.count / top, tone="bad")
        for c in report.failures_by_reason
    ]
    rows += [
        Row(
            f"{label(f.reason)} · {segment(f'{f.dimension}:{f.value}')}",
            [cell(f"failure:{f.reason}", f"{f.dimension}:{f.value}")],
            tone="muted",
        )
        for f in report.failures_by_cohort
    ]
    note = "" if rows else "No device failed."
    return Table(
        "Failures by reason and segment",
        ["devices"],
        rows,
        note=note + " A failure stays counted after a rollback reverts the device.",
        anchor="failures",
    )


_SEGMENT_COLUMNS = (
    ("exposed", "exposed"),
    ("installed", "installed"),
    ("active", "active"),
    ("used", "used"),
    ("failed", "failed"),
    ("used_share", "use share"),
    ("holdout_used_share", "holdout use share"),
)


def _segments(report: report_pb2.RolloutReport, cell: Any) -> Table:
    return Table(
        "Segments: model, region, firmware",
        [title for _, title in _SEGMENT_COLUMNS],
        [
            Row(
                segment(f"{c.dimension}:{c.value}"),
                [cell(f"{c.dimension}:{c.value}", k) for k, _ in _SEGMENT_COLUMNS],
            )
            for c in report.cohorts
        ],
        note=(
            "used: devices that reported using the feature; use share: health samples "
            "reporting a use, exposed devices vs the segment's holdout devices."
        ),
        anchor="segments",
        wide=True,
    )


_LABEL_COLUMNS = (
    ("exposed", "exposed"),
    ("applied", "applied"),
    ("used", "used"),
    ("device_use_share", "used, of exposed"),
    ("holdout_devices", "holdout"),
    ("holdout_used", "holdout used"),
    ("holdout_device_use_share", "used, of holdout"),
)


def _labels(report: report_pb2.RolloutReport, cell: Any) -> Table:
    return Table(
        "Segments: device labels",
        [title for _, title in _LABEL_COLUMNS],
        [
            Row(
                "other labels" if s.label == OTHER_LABELS else s.label,
                [cell(f"label:{s.label}", k) for k, _ in _LABEL_COLUMNS],
                tone="muted" if s.label == OTHER_LABELS else "",
            )
            for s in report.labels
        ],
        note=(
            "Devices per label (key=value), most devices first; a device counts under each "
            f"of its labels. After {MAX_LABELS} labels the rest are summed as other labels. "
            "applied: running it now; used: reported using it at least once. A holdout "
            "device's use is known only while it runs some version of the feature."
            if report.labels
            else "No exposed or holdout device carries a label."
        ),
        anchor="labels",
        wide=True,
    )


def _health(report: report_pb2.RolloutReport, cell: Any) -> Table:
    h = report.health
    groups = [h.exposed, h.control] if h.HasField("control") else [h.exposed]
    keys = (
        "devices",
        "samples",
        "crashes",
        "feature_errors",
        "unhealthy",
        "samples_used",
        "uses",
        "used_share",
    )
    return Table(
        "Health: exposed vs holdout",
        [g.name for g in groups],
        [Row(label(k), [cell(f"health_{g.name}", k) for g in groups]) for k in keys],
        note=h.note,
        anchor="health",
    )


def _charts(report: report_pb2.RolloutReport) -> dict[str, Any]:
    curve = report.adoption_curve
    usage = report.usage_curve
    return {
        "resolution": report.curve_resolution_seconds,
        "curve": {
            "t": [p.time.seconds for p in curve],
            "series": {
                key: [getattr(p, key) for p in curve]
                for key in ("installed", "active", "used", "failed", "reverted")
            },
        },
        "usage": {
            "t": [u.time.seconds for u in usage],
            "exposed": [_share(u.samples_used, u.samples) for u in usage],
            "holdout": [_share(u.holdout_samples_used, u.holdout_samples) for u in usage],
        },
        "markers": [
            {"t": e.time.seconds, "n": i + 1, "label": label(e.action)}
            for i, e in enumerate(report.timeline)
        ],
    }


def _share(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


@dataclass(frozen=True)
class FeatureView:
    feature: str
    rows: list[Row]
    rollouts: list[tuple[str, str, str]]  # (rollout id, version, state label)
    charts: dict[str, Any]

    @property
    def charts_json(self) -> str:
        return json.dumps(self.charts, separators=(",", ":")).replace("</", "<\\/")


def build_feature_view(report: report_pb2.FeatureReport) -> FeatureView:
    times = sorted({p.time.seconds for v in report.versions for p in v.points})
    series: dict[str, list[int | None]] = {}
    for v in report.versions:
        at = {p.time.seconds: p.devices for p in v.points}
        series[v.version] = [at.get(t) for t in times]
    if times:
        # Each point closes a minute: the chart starts from 0 at the first minute's start.
        times.insert(0, times[0] - 60)
        for values in series.values():
            values.insert(0, 0)
    return FeatureView(
        report.feature,
        [
            Row(v.version, [Cell(f"devices_now|{v.version}", str(v.devices_now))])
            for v in report.versions
        ],
        [
            (r.rollout_id, r.version, rollout_state_label(rollout_state(r.state)))
            for r in report.rollouts
        ],
        {"versions": {"t": times, "series": series}},
    )
