"""The adoption report as a terminal table, CSV or JSON (all from one RolloutReport).

`figures` lists every number of a report once, as (section, key, value); the
CSV is exactly that list, and the table prints the same values, so a
spreadsheet, a script and a person read the same figures.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from google.protobuf.json_format import MessageToJson
from rich.console import Console
from rich.table import Table

from ota.reports.figures import (
    feature_figures,
    figures,
    header,
    pct,
    rollout_state,
    secs,
)
from ota.v1 import report_pb2


def _table(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> Table:
    t = Table(title=title, title_justify="left")
    for name in columns:
        t.add_column(name)
    for row in rows:
        t.add_row(*row)
    return t


def render_table(report: report_pb2.RolloutReport, console: Console) -> None:
    """The report for a terminal: a header line, then one table per section."""
    head = dict((k, v) for _, k, v in header(report))
    stage = f"{head['stage']}/{head['stages']}" if head["stage"] else "-"
    console.print(
        f"[bold]Adoption report[/bold]  rollout {head['rollout_id']}  feature {head['feature']} "
        f"{head['version']}  state {head['state']}  stage {stage}  "
        f"plan {head['plan_version'] or '-'}"
    )
    console.print(
        f"signed by {head['signer_keyids'] or '-'}  data as of {head['data_time'] or 'no data'}"
    )
    by_section: dict[str, list[tuple[str, str]]] = {}
    for section, key, value in figures(report):
        by_section.setdefault(section, []).append((key, value))
    console.print(
        _table("Exposure", ("figure", "devices"), by_section["exposure"] + by_section["gap"])
    )
    console.print(
        _table(
            "Funnel",
            ("step", "devices", "conversion", "median step s"),
            [
                (s.step, str(s.devices), pct(s.conversion_ppm), secs(s.median_step_seconds))
                for s in report.funnel
            ],
        )
    )
    if report.stage_funnels:
        console.print(
            _table(
                "Funnel per stage",
                ("stage", "ppm", *(s.step for s in report.funnel)),
                [
                    (str(sf.stage + 1), str(sf.ppm), *(str(s.devices) for s in sf.steps))
                    for sf in report.stage_funnels
                ],
            )
        )
    console.print(_table("Current state", ("state", "devices"), by_section.get("state", [])))
    if report.failures_by_reason:
        console.print(
            _table(
                "Failures by reason",
                ("reason", "devices"),
                [(c.key, str(c.count)) for c in report.failures_by_reason],
            )
        )
        console.print(
            _table(
                "Failures by cohort",
                ("reason", "dimension", "value", "devices"),
                [
                    (f.reason, f.dimension, f.value, str(f.devices))
                    for f in report.failures_by_cohort
                ],
            )
        )
    console.print(
        _table(
            "Cohorts",
            ("dimension", "value", "exposed", "installed", "active", "failed"),
            [
                (
                    c.dimension,
                    c.value,
                    str(c.exposed),
                    str(c.installed),
                    str(c.active),
                    str(c.failed),
                )
                for c in report.cohorts
            ],
        )
    )
    console.print(
        _table(
            "Time to install / first use (seconds)",
            ("measure", "devices", "p50", "p90", "p99"),
            [
                (
                    x.name,
                    str(x.devices),
                    secs(x.p50_seconds),
                    secs(x.p90_seconds),
                    secs(x.p99_seconds),
                )
                for x in report.latencies
            ],
        )
    )
    health_rows = [
        (section.removeprefix("health_"), key, value)
        for section, rows in by_section.items()
        if section.startswith("health_")
        for key, value in rows
    ]
    console.print(_table("Health", ("group", "figure", "value"), health_rows))
    if not report.health.HasField("control"):
        console.print(f"[dim]{report.health.note}[/dim]")
    console.print(
        _table(
            "Stragglers",
            ("figure", "devices"),
            by_section["stragglers"] + [(f"last seen {k}", v) for k, v in by_section["last_seen"]],
        )
    )
    if report.adoption_curve:
        console.print(
            _table(
                "Adoption curve",
                ("until", "active", "installed", "failed", "reverted"),
                [
                    (
                        p.time.ToDatetime().strftime("%H:%M"),
                        str(p.active),
                        str(p.installed),
                        str(p.failed),
                        str(p.reverted),
                    )
                    for p in report.adoption_curve
                ],
            )
        )
    console.print(
        _table(
            "Timeline",
            ("time", "actor", "action", "state", "reason"),
            [
                (
                    e.time.ToDatetime().strftime("%H:%M:%S"),
                    e.actor,
                    e.action,
                    rollout_state(e.to_state),
                    e.reason,
                )
                for e in report.timeline
            ],
        )
    )


def render_csv(report: report_pb2.RolloutReport) -> str:
    """One row per figure: section, key, value (spreadsheet-friendly long form)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "key", "value"])
    w.writerows(header(report))
    w.writerows(figures(report))
    return out.getvalue()


def render_json(report: report_pb2.RolloutReport | report_pb2.FeatureReport) -> str:
    return MessageToJson(report, preserving_proto_field_name=True, sort_keys=True) + "\n"


def render_feature_table(report: report_pb2.FeatureReport, console: Console) -> None:
    console.print(f"[bold]Feature report[/bold]  {report.feature}")
    console.print(
        _table(
            "Devices running each version now",
            ("version", "devices"),
            [(v.version, str(v.devices_now)) for v in report.versions],
        )
    )
    console.print(
        _table(
            "Rollouts",
            ("rollout", "version", "state"),
            [(r.rollout_id, r.version, rollout_state(r.state)) for r in report.rollouts],
        )
    )


def render_feature_csv(report: report_pb2.FeatureReport) -> str:
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "key", "value"])
    w.writerows(feature_figures(report))
    return out.getvalue()
