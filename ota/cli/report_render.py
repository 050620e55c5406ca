"""The adoption report as a terminal table, CSV or JSON (all from one RolloutReport)."""

from __future__ import annotations

import csv
import io

from google.protobuf.json_format import MessageToJson
from rich.console import Console
from rich.table import Table

from ota.v1 import report_pb2, rollout_pb2


def _pct(ppm: int) -> str:
    return f"{ppm / 10_000:.1f}%"


def render_table(report: report_pb2.RolloutReport, console: Console) -> None:
    r = report.rollout
    state = rollout_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")
    stage = f"{r.current_stage + 1}/{len(r.stages)}" if r.current_stage >= 0 else "-"
    console.print(
        f"[bold]Adoption report[/bold]  rollout {r.rollout_id}  feature {r.feature} {r.version}  "
        f"state {state}  stage {stage}"
    )
    fresh = report.data_time.ToDatetime().isoformat() if report.data_time.seconds else "no data"
    console.print(
        f"eligible {report.eligible}  target {report.target_exposed}  exposed {report.exposed}  "
        f"events {report.events_ingested}  data as of {fresh}"
    )
    funnel = Table(title="Funnel", title_justify="left")
    for col in ("step", "devices", "conversion"):
        funnel.add_column(col)
    for step in report.funnel:
        funnel.add_row(step.step, str(step.devices), _pct(step.conversion_ppm))
    console.print(funnel)
    states = Table(title="Current state", title_justify="left")
    states.add_column("state")
    states.add_column("devices")
    for c in report.current_states:
        states.add_row(c.key, str(c.count))
    console.print(states)
    if report.failures_by_reason:
        failures = Table(title="Failures by reason", title_justify="left")
        failures.add_column("reason")
        failures.add_column("devices")
        for c in report.failures_by_reason:
            failures.add_row(c.key, str(c.count))
        console.print(failures)
    cohorts = Table(title="Cohorts", title_justify="left")
    for col in ("dimension", "value", "exposed", "active", "failed"):
        cohorts.add_column(col)
    for cohort in report.cohorts:
        cohorts.add_row(
            cohort.dimension,
            cohort.value,
            str(cohort.exposed),
            str(cohort.active),
            str(cohort.failed),
        )
    console.print(cohorts)
    timeline = Table(title="Timeline", title_justify="left")
    for col in ("time", "actor", "action", "state", "reason"):
        timeline.add_column(col)
    for e in report.timeline:
        timeline.add_row(
            e.time.ToDatetime().strftime("%H:%M:%S"),
            e.actor,
            e.action,
            rollout_pb2.RolloutState.Name(e.to_state).removeprefix("ROLLOUT_STATE_"),
            e.reason,
        )
    console.print(timeline)


def render_csv(report: report_pb2.RolloutReport) -> str:
    """One row per figure: section, key, value (spreadsheet-friendly long form)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "key", "value"])
    r = report.rollout
    w.writerow(["header", "rollout_id", r.rollout_id])
    w.writerow(["header", "feature", r.feature])
    w.writerow(["header", "version", r.version])
    w.writerow(
        ["header", "state", rollout_pb2.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_")]
    )
    for key in ("eligible", "target_exposed", "exposed", "events_ingested"):
        w.writerow(["header", key, getattr(report, key)])
    for step in report.funnel:
        w.writerow(["funnel", step.step, step.devices])
    for c in report.current_states:
        w.writerow(["state", c.key, c.count])
    for c in report.failures_by_reason:
        w.writerow(["failure", c.key, c.count])
    for cohort in report.cohorts:
        for key in ("exposed", "active", "failed"):
            w.writerow([f"{cohort.dimension}:{cohort.value}", key, getattr(cohort, key)])
    return out.getvalue()


def render_json(report: report_pb2.RolloutReport) -> str:
    return MessageToJson(report, preserving_proto_field_name=True, sort_keys=True) + "\n"
