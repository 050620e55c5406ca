"""The adoption report as one self-contained HTML file with interactive charts.

The same template as the dashboard's rollout page (`ota/web/templates`), with
the stylesheet and the scripts inlined (uPlot, about 50 KB, and the chart
code), so the file opens offline -- no CDN, no fonts, no network at all -- and
prints on A4. Every number carries a `data-figure` attribute naming its
(section, key), the same names as the CSV.
"""

from __future__ import annotations

from ota.reports.view import build_feature_view, build_view
from ota.v1 import report_pb2
from ota.web.assets import SCRIPTS, STYLES, environment, text


def _inline(names: tuple[str, ...]) -> str:
    return "\n".join(text(n) for n in names)


def render_html(report: report_pb2.RolloutReport) -> str:
    """The whole report as one HTML document."""
    return (
        environment()
        .get_template("report_file.html")
        .render(view=build_view(report), css=_inline(STYLES), scripts=_inline(SCRIPTS))
    )


def render_feature_html(report: report_pb2.FeatureReport) -> str:
    """Version distribution over time across the feature's rollouts."""
    return (
        environment()
        .get_template("feature_file.html")
        .render(
            view=build_feature_view(report),
            css=_inline(STYLES),
            scripts=_inline(SCRIPTS),
            links=None,
        )
    )
