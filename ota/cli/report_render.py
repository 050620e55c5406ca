"""The adoption report as a terminal table, CSV or JSON (all from one RolloutReport).

`figures` lists every number of a report once, as (section, key, value); the
CSV is exactly that list, and the table prints the same values, so a
spreadsheet, a script and a person read the same figures.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table as RichTable

from ota.cli.output import plain
from ota.reports.figures import feature_figures, figures, header, rollout_state
from ota.reports.view import Row, Table, build_view
from ota.v1 import report_pb2


def _table(title: str, columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> RichTable:
    t = RichTable(title=title, title_justify="left")
    for name in columns:
        t.add_column(name)
    for row in rows:
        t.add_row(*row)
    return t


def render_table(report: report_pb2.RolloutReport, console: Console) -> None:
    """The report for a terminal: a header line, then one table per section."""
    view = build_view(report)
    console.print(
        f"[bold]Adoption report[/bold]  rollout {view.rollout_id}  feature {view.feature} "
        f"{view.version}  state {view.state_label}  stage {view.stage}  plan v{view.plan_version}",
        highlight=False,
    )
    signers = ", ".join(short for short, _ in view.signers) or "-"
    console.print(
        f"signed by {signers}  data as of {view.data_time.value or 'no data yet'}",
        highlight=False,
    )
    if view.outcome is not None:
        console.print(f"[bold red]{view.outcome.headline}[/bold red]", highlight=False)
        for name, c in view.outcome.cells:
            console.print(f"  {name}: {c.value}", markup=False, highlight=False)
    funnel = [Row(r.label, r.cells) for r in view.funnel]
    console.print(
        _view_table(Table("Funnel", ["devices", "of previous", "median step (s)"], funnel))
    )
    for t in view.tables:
        if t.rows:
            console.print(_view_table(t))
        if t.note and t.anchor == "health" and not report.health.HasField("control"):
            console.print(f"[dim]{t.note}[/dim]")
    if report.adoption_curve:
        console.print(
            _table(
                f"Adoption curve (every {report.curve_resolution_seconds} s)",
                ("until", "installed", "active", "used", "failed", "reverted"),
                [
                    (
                        p.time.ToDatetime().strftime("%H:%M:%S"),
                        str(p.installed),
                        str(p.active),
                        str(p.used),
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
            ("#", "time", "by", "action", "state", "why"),
            [(str(a.number), a.time, a.actor, a.action, a.state, a.reason) for a in view.audit],
        )
    )


def _view_table(t: Table) -> RichTable:
    columns = ["", *t.columns] if len(t.columns) > 1 or t.wide else ["", t.columns[0]]
    out = RichTable(title=t.title, title_justify="left")
    for i, name in enumerate(columns):
        # A narrow terminal folds a long row name (`site=depot-a`) onto two lines
        # rather than cut it: the name is what tells rows apart.
        out.add_column(name, justify="right" if i else "left", overflow="ellipsis" if i else "fold")
    for r in t.rows:
        out.add_row(r.label, *(c.value for c in r.cells))
    return out


def render_csv(report: report_pb2.RolloutReport) -> str:
    """One row per figure: section, key, value (spreadsheet-friendly long form)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(["section", "key", "value"])
    w.writerows(header(report))
    w.writerows(figures(report))
    return out.getvalue()


def render_json(report: report_pb2.RolloutReport | report_pb2.FeatureReport) -> str:
    # The report's own document, in the CLI's JSON convention (hex hashes, numbers).
    return json.dumps(plain(report), indent=2, sort_keys=True) + "\n"


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
