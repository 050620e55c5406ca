"""`python -m bench --quick` runs every benchmark end to end and writes its results.

Checked: that the benchmarks run and report, and figures that can fail
whatever the machine (positive figures, ratios in range, counts that must be
equal); never a time or a ratio against its target, which depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = (
    "control-api",
    "telemetry-ingest",
    "download",
    "report",
    "dashboard",
    "rollout-e2e",
    "fleet-connect",
    "notify-fleet",
    "origin-load",
    "device-identity",
)
KEYS = {
    "name",
    "mode",
    "figure",
    "baseline",
    "ratio",
    "targets",
    "met",
    "details",
    "machine",
    "started_at",
    "elapsed_s",
}


@pytest.mark.timeout(360)
def test_quick_bench_runs_every_benchmark_and_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results-dir", str(out)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        assert result.keys() >= KEYS, name
        assert result["name"] == name
        assert result["mode"] == "quick"
        assert {"value", "unit", "label"} <= result["figure"].keys()
        assert {"value", "unit", "label"} <= result["baseline"].keys()
        assert result["figure"]["value"] is not None
        assert all({"what", "met", "note"} <= t.keys() for t in result["targets"])
        assert result["machine"]["nproc"] >= 1
        assert name in proc.stdout
        assert result["figure"]["value"] > 0, name
        if result["ratio"] is not None:
            assert 0 < result["ratio"] < 10_000, name
    # Figures that can fail: every device finished and reported, nothing was lost.
    e2e = json.loads((out / "rollout-e2e.json").read_text())["details"]
    assert e2e["outcomes"] == e2e["report_states"] == {"ACTIVE": e2e["devices"]}
    assert e2e["events_sent"] == e2e["events_stored_after_settling"] > 0
    assert e2e["events_lost"] == 0
    report = json.loads((out / "report.json").read_text())["details"]
    assert report["draft_eligible"] == report["report_eligible"] > 0
    assert report["draft_report_ms"] > 0
    # The cache took the load.
    origin = json.loads((out / "origin-load.json").read_text())
    details = origin["details"]
    assert details["active"] == details["devices"] > 0
    assert details["origin_requests_by_kind"]["bundle"] >= 1
    assert 0 < origin["figure"]["value"] < origin["baseline"]["value"]
    assert details["cache_requests"] >= 4 * details["devices"]
