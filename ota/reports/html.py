"""The adoption report as one self-contained HTML file with interactive charts.

Charts are plotly figures; plotly.js is inlined once in the page, so the file
opens offline (no CDN, no fonts, no network at all) and prints on A4 through
the print stylesheet. Every number shown in a table carries a `data-figure`
attribute naming its (section, key), the same names as the CSV.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

from ota.reports.figures import Figure, feature_figures, figures, header, rollout_state
from ota.v1 import report_pb2

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5rem; color: #1d2330; }
h1 { font-size: 1.5rem; margin: 0 0 .25rem; } h2 { font-size: 1.1rem; margin: 1.5rem 0 .5rem; }
.meta { color: #556; margin-bottom: 1rem; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 1rem; }
.card { border: 1px solid #dde1ea; border-radius: 8px; padding: .75rem 1rem; break-inside: avoid; }
.kpis { display: flex; flex-wrap: wrap; gap: .75rem; }
.kpi { border: 1px solid #dde1ea; border-radius: 8px; padding: .5rem .9rem; min-width: 7rem; }
.kpi b { display: block; font-size: 1.4rem; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: .2rem .5rem; border-bottom: 1px solid #eef0f5; }
td.n { text-align: right; } .note { color: #667; font-style: italic; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  .card, .chart { break-inside: avoid; page-break-inside: avoid; }
  .modebar-container { display: none !important; }
  @page { size: A4; margin: 12mm; }
}
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _cell(section: str, key: str, value: str) -> str:
    return f"<td class=n data-figure='{_esc(section)}|{_esc(key)}'>{_esc(value)}</td>"


def _figure_table(title: str, rows: Iterable[Figure], *, strip: str = "") -> str:
    """A (group, figure, value) table: one row per figure."""
    body = "".join(
        f"<tr><td>{_esc(s.removeprefix(strip))}</td><td>{_esc(k)}</td>{_cell(s, k, v)}</tr>"
        for s, k, v in rows
    )
    return f"<div class=card><h2>{_esc(title)}</h2><table>{body}</table></div>"


def _wide_table(title: str, columns: list[str], rows: list[tuple[str, list[Figure]]]) -> str:
    """Rows of figures under column headings, e.g. one funnel step per row."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in ["", *columns])
    body = "".join(
        f"<tr><td>{_esc(label)}</td>{''.join(_cell(*f) for f in cells)}</tr>"
        for label, cells in rows
    )
    return f"<div class=card><h2>{_esc(title)}</h2><table><tr>{head}</tr>{body}</table></div>"


def _chart(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(
        margin={"l": 50, "r": 20, "t": 40, "b": 40}, height=320, template="plotly_white"
    )
    body: str = fig.to_html(
        include_plotlyjs=False,
        full_html=False,
        div_id=div_id,
        default_width="100%",
        config={"displaylogo": False, "displayModeBar": "hover", "responsive": True},
    )
    return f"<div class='card chart'>{body}</div>"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style>"
        f"<script>{get_plotlyjs()}</script></head><body>{body}</body></html>\n"
    )


def render_html(report: report_pb2.RolloutReport) -> str:
    """The whole report as one HTML document."""
    head = {k: v for _, k, v in header(report)}
    all_figures = figures(report)
    sections: dict[str, list[Figure]] = {}
    for f in all_figures:
        sections.setdefault(f[0], []).append(f)
    stage = f"{head['stage']}/{head['stages']}" if head["stage"] else "not started"
    parts = [
        f"<h1>{_esc(head['feature'])} {_esc(head['version'])} — adoption</h1>",
        f"<div class=meta>rollout {_esc(head['rollout_id'])} · state <b>{_esc(head['state'])}</b>"
        f" · stage {_esc(stage)} · plan {_esc(head['plan_version'] or '-')}"
        f" · signed by {_esc(head['signer_keyids'] or '-')}"
        f" · data as of {_esc(head['data_time'] or 'no data')}</div>",
        "<div class=kpis>",
    ]
    for s, k, v in sections["exposure"]:
        parts.append(
            f"<div class=kpi>{_esc(k.replace('_', ' '))}"
            f"<b data-figure='{_esc(s)}|{_esc(k)}'>{_esc(v)}</b></div>"
        )
    parts.append("</div><div class=grid>")

    steps = [s.step for s in report.funnel]
    funnel = go.Figure(
        go.Funnel(
            y=steps,
            x=[s.devices for s in report.funnel],
            textinfo="value+percent previous",
        )
    )
    funnel.update_layout(title="Funnel")
    parts.append(_chart(funnel, "chart-funnel"))

    curve = go.Figure()
    times = [p.time.ToDatetime() for p in report.adoption_curve]
    for key, colour in (
        ("active", "#2a9d8f"),
        ("installed", "#264653"),
        ("failed", "#e76f51"),
        ("reverted", "#8d99ae"),
    ):
        curve.add_trace(
            go.Scatter(
                x=times,
                y=[getattr(p, key) for p in report.adoption_curve],
                name=key,
                mode="lines+markers",
                line={"color": colour, "shape": "hv"},
            )
        )
    for e in report.timeline:
        when = e.time.ToDatetime()
        curve.add_vline(x=when, line_dash="dot", line_color="#999")
        curve.add_annotation(
            x=when, y=1, yref="paper", text=e.action, showarrow=False, textangle=-90, xanchor="left"
        )
    curve.update_layout(title="Adoption over time (audit events marked)")
    parts.append(_chart(curve, "chart-curve"))

    if report.failures_by_reason:
        failures = go.Figure(
            go.Bar(
                x=[c.key for c in report.failures_by_reason],
                y=[c.count for c in report.failures_by_reason],
                marker_color="#e76f51",
            )
        )
        failures.update_layout(title="Failures by reason")
        parts.append(_chart(failures, "chart-failures"))

    cohorts = go.Figure()
    labels = [f"{c.dimension}={c.value}" for c in report.cohorts]
    for key in ("exposed", "installed", "active", "failed"):
        cohorts.add_trace(go.Bar(x=labels, y=[getattr(c, key) for c in report.cohorts], name=key))
    cohorts.update_layout(title="By model, region and firmware", barmode="group")
    parts.append(_chart(cohorts, "chart-cohorts"))

    if report.stragglers.unreachable + report.stragglers.reachable_not_applied:
        last_seen = go.Figure(
            go.Bar(
                x=[c.key for c in report.stragglers.last_seen],
                y=[c.count for c in report.stragglers.last_seen],
                marker_color="#8d99ae",
            )
        )
        last_seen.update_layout(title="Stragglers: last seen")
        parts.append(_chart(last_seen, "chart-last-seen"))
    parts.append("</div><div class=grid>")

    parts.append(_figure_table("Exposure gap", sections.get("gap", [])))
    funnel_sections = ("funnel", "funnel_conversion", "funnel_median_seconds")
    parts.append(
        _wide_table(
            "Funnel",
            ["devices", "conversion", "median step s"],
            [
                (
                    step.step,
                    [f for f in all_figures if f[1] == step.step and f[0] in funnel_sections],
                )
                for step in report.funnel
            ],
        )
    )
    parts.append(_figure_table("Current state", sections.get("state", [])))
    parts.append(
        _figure_table(
            "Failures",
            [f for f in all_figures if f[0] == "failure" or f[0].startswith("failure:")],
        )
    )
    cohort_rows: dict[str, list[Figure]] = {}
    for f in all_figures:
        if f[0].split(":")[0] in ("model", "region", "firmware"):
            cohort_rows.setdefault(f[0], []).append(f)
    parts.append(
        _wide_table(
            "By model, region and firmware",
            ["exposed", "installed", "active", "failed"],
            list(cohort_rows.items()),
        )
    )
    parts.append(
        _figure_table(
            "Time to install / first use",
            [f for f in all_figures if f[0].startswith("time_to_")],
            strip="time_to_",
        )
    )
    health = [f for f in all_figures if f[0].startswith("health_")]
    note = "" if report.health.HasField("control") else report.health.note
    parts.append(
        _figure_table("Health", health, strip="health_").replace(
            "</table>", f"</table><p class=note>{_esc(note)}</p>"
        )
    )
    parts.append(
        _figure_table("Stragglers", sections.get("stragglers", []) + sections.get("last_seen", []))
    )
    timeline = "".join(
        f"<tr><td>{_esc(e.time.ToDatetime().strftime('%Y-%m-%d %H:%M:%S'))}</td>"
        f"<td>{_esc(e.actor)}</td><td>{_esc(e.action)}</td>"
        f"<td>{_esc(rollout_state(e.to_state))}</td><td>{_esc(e.reason)}</td></tr>"
        for e in report.timeline
    )
    parts.append(
        "</div><div class=card><h2>Audit timeline</h2><table><tr><th>time</th><th>actor</th>"
        f"<th>action</th><th>state</th><th>reason</th></tr>{timeline}</table></div>"
    )
    return _page(f"{head['feature']} {head['version']} adoption", "".join(parts))


def render_feature_html(report: report_pb2.FeatureReport) -> str:
    """Version distribution over time across the feature's rollouts."""
    fig = go.Figure()
    for v in report.versions:
        fig.add_trace(
            go.Scatter(
                x=[p.time.ToDatetime() for p in v.points],
                y=[p.devices for p in v.points],
                name=v.version,
                stackgroup="versions",
                line={"shape": "hv"},
            )
        )
    fig.update_layout(title=f"Devices running each version of {report.feature}")
    body = (
        f"<h1>{_esc(report.feature)} — versions across rollouts</h1>"
        + _chart(fig, "chart-versions")
        + _figure_table("Figures", feature_figures(report))
    )
    return _page(f"{report.feature} versions", body)
