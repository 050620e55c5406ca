"""dashboard: the rollout page at 10 000 devices vs the JSON report call.

The same store the `report` benchmark builds (devices registered, a rollout
exposed, ten events per device ingested), at 10 000 devices. Three server-side
costs, each the median of many runs:

- the JSON report call (baseline): what `GetRolloutReport` and `ota report
  --format json` cost the server: build the report from the aggregates,
  convert it to the message, serialise it as JSON;
- the rollout page: the same report rendered as the dashboard's HTML page
  (`Dashboard.rollout_page`: report, view, template);
- a live update: what one watcher does when the rollout changed: build the
  report and render the fragment pushed to every viewer of it;
- a check: the fingerprint a watcher reads every second to see whether the
  rollout changed (one per viewed rollout, whatever the number of viewers).

And the bytes a browser fetches on first load (the page and its assets) and
after (the page alone: the assets are cached as immutable).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from google.protobuf.json_format import MessageToJson

from bench.common import Figure, Result, Target, log, ratio
from bench.report import _build
from ota.api import convert
from ota.api.auth import Authenticator, Caller
from ota.clock import SystemClock
from ota.reports import model as report_model
from ota.store.database import migrate, open_database
from ota.store.session import Store
from ota.web.app import Dashboard
from ota.web.assets import SCRIPTS, STYLES, assets
from ota.web.live import fingerprint

NAME = "dashboard"


def run(quick: bool) -> Result:
    devices = 1_000 if quick else 10_000
    runs = 7 if quick else 31
    with tempfile.TemporaryDirectory(prefix="ota-bench-dashboard-") as tmp:
        db = open_database(f"sqlite:///{Path(tmp) / 'ota.db'}")
        try:
            migrate(db)
            store = Store(db)
            rollout_id, _draft_id, phases = _build(store, devices)
            clock = SystemClock()
            dashboard = Dashboard(store, Authenticator(store, {}), clock, secure_cookies=False)
            viewer = Caller("viewer", "bench")

            def json_report() -> str:
                with store.transaction() as session:
                    value = report_model.build_report(session, rollout_id, clock.now())
                message = convert.report(value, value.current_states)
                return MessageToJson(message, preserving_proto_field_name=True)

            def page() -> bytes:
                return bytes(dashboard.rollout_page(rollout_id, viewer).body)

            def live_update() -> str:
                return dashboard.render_report_fragment(rollout_id)

            def check() -> object:
                return fingerprint(store, rollout_id)

            # Interleaved: each round times all four once, so drift on the machine
            # (it is shared) touches them alike; the medians are compared.
            calls = {"json": json_report, "page": page, "update": live_update, "check": check}
            times: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                call()  # warm the caches
            for _ in range(runs):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t0) * 1000)
            base_ms, page_ms, update_ms, check_ms = (
                statistics.median(times[k]) for k in ("json", "page", "update", "check")
            )
            base_runs, page_runs, update_runs = (
                [round(t, 2) for t in times[k]] for k in ("json", "page", "update")
            )
            html = page()
            fragment = live_update().encode()
            files = assets()
            first_load = len(html) + sum(len(files[n].body) for n in (*SCRIPTS, *STYLES))
            first_load += len(files["live.js"].body)
            log(
                f"JSON report {base_ms:.1f} ms, page {page_ms:.1f} ms, live update "
                f"{update_ms:.1f} ms, check {check_ms:.1f} ms; page {len(html):,} B, first load {first_load:,} B"
            )
        finally:
            db.dispose()
    page_ratio = ratio(page_ms, base_ms)
    update_ratio = ratio(update_ms, base_ms)
    return Result(
        name=NAME,
        mode="quick" if quick else "full",
        figure=Figure(page_ms, "ms", f"rollout page at {devices:,} devices (server time)"),
        baseline=Figure(base_ms, "ms", "the JSON report call (build, convert, serialise)"),
        ratio=page_ratio,
        targets=[
            Target("page <= 2x the JSON report", page_ratio is not None and page_ratio <= 2),
            Target("page <= 50 ms", page_ms <= 50),
            Target(
                "live update <= 2x the JSON report",
                update_ratio is not None and update_ratio <= 2,
            ),
            Target("live update <= 50 ms", update_ms <= 50),
            Target("first load <= 1 MB", first_load <= 1_000_000),
        ],
        details={
            "devices": devices,
            "events": phases["events"],
            "runs": runs,
            "page_runs_ms": page_runs,
            "baseline_runs_ms": base_runs,
            "live_update_ms": update_ms,
            "live_update_runs_ms": update_runs,
            "live_update_ratio": update_ratio,
            "check_ms": check_ms,
            "page_bytes": len(html),
            "live_update_bytes": len(fragment),
            "first_load_bytes": first_load,
            "note": "ratio is page / JSON report (lower is better)",
        },
    )
