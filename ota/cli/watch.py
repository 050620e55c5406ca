"""`ota rollout watch`: live progress, drawn from the same report `ota report` prints.

WatchRollout says *when* something changed (a transition, devices moving);
each change is then shown from the adoption report (`GetRolloutReport`), so
the live view and the report cannot disagree: the per-stage bars are the
report's stage funnels.
"""

from __future__ import annotations

import time

from google.protobuf.json_format import MessageToJson
from rich.console import Console

from ota.client import Client
from ota.reports.figures import rollout_state
from ota.v1 import report_pb2, rollout_pb2

# At most one report per this many seconds while devices stream in.
REFRESH_SECONDS = 1.0


def bar(done: int, total: int, width: int = 24) -> str:
    filled = min(width, width * done // total) if total else 0
    return "█" * filled + "·" * (width - filled)


def progress_lines(report: report_pb2.RolloutReport) -> list[str]:
    """One line per stage that exposed devices, from the report's stage funnels."""
    lines: list[str] = []
    for sf in report.stage_funnels:
        steps = {s.step: s.devices for s in sf.steps}
        exposed = steps.get("TARGETED", 0)
        if not exposed:
            continue
        active = steps.get("ACTIVE", 0)
        lines.append(
            f"   stage {sf.stage + 1} {sf.ppm / 10_000:>6g}%  {bar(active, exposed)} "
            f"active {active}/{exposed}  installed {steps.get('INSTALLED', 0)}  "
            f"used {steps.get('USED', 0)}"
        )
    failed = sum(c.count for c in report.failures_by_reason)
    active = next((s.devices for s in report.funnel if s.step == "ACTIVE"), 0)
    lines.append(
        f"   total  {bar(active, report.eligible - report.exposure_gap.holdout)} "
        f"exposed {report.exposed}/{report.eligible - report.exposure_gap.holdout} eligible"
        + (f" (holdout {report.exposure_gap.holdout})" if report.exposure_gap.holdout else "")
        + f"  failed {failed}  "
        f"unreachable {report.stragglers.unreachable}  [{rollout_state(report.rollout.state)}]"
    )
    return lines


def watch_rollout(
    client: Client, rollout_id: str, *, json_lines: bool = False, console: Console | None = None
) -> str:
    """Print transitions and progress until the rollout ends; returns its final state."""
    console = console or Console()
    final = ""
    shown = 0.0
    stream = client.rollouts.WatchRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    for update in stream:
        final = rollout_state(update.rollout.state)
        if json_lines:
            print(MessageToJson(update, indent=None, preserving_proto_field_name=True))
            continue
        for e in update.events:
            console.print(
                f"[bold]{e.time.ToDatetime().strftime('%H:%M:%S')}[/bold] {e.actor:<8} "
                f"{e.action:<9} {rollout_state(e.to_state):<11} {e.reason}"
            )
        ended = update.rollout.state in (
            rollout_pb2.ROLLOUT_STATE_COMPLETED,
            rollout_pb2.ROLLOUT_STATE_ABORTED,
            rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
        )
        if update.events or ended or time.monotonic() - shown >= REFRESH_SECONDS:
            report = client.reports.GetRolloutReport(
                report_pb2.GetRolloutReportRequest(rollout_id=rollout_id),
                metadata=client.metadata,
            )
            shown = time.monotonic()
            for line in progress_lines(report):
                console.print(line, style="dim")
    return final
