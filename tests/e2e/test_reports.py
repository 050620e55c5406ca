"""Adoption reports against what simulated devices really did (PROTOCOL §8).

A fleet with a failing model, devices that drop offline and come back, devices
that re-send events with the same seq, and a rollback; every count of the
report is checked against the simulator's own record. Then the report's forms:
CSV and JSON round-trip to the ReportService figures and the terminal table,
and the HTML file opens in headless Chromium with the network disabled.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from google.protobuf.json_format import Parse
from rich.console import Console

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, compose_fleet
from ota.cli.report_render import render_table
from ota.client import Client
from ota.devstack import DevStack
from ota.domain.states import FUNNEL, RANK
from ota.reports.figures import figures, header
from ota.reports.labels import label
from ota.v1 import report_pb2, rollout_pb2
from tests.e2e.scenario import MODELS, REGIONS, publish, report, report_states, wait_for

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _fleet(stack: DevStack, tmp_path: Path, count: int, **settings: object) -> SimulatedFleet:
    fleet = SimulatedFleet(
        compose_fleet(count, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse(["ev9@2.0.0=1.0"]),
            **settings,  # type: ignore[arg-type]
        ),
    )
    fleet.start()
    return fleet


def _start(client: Client, version: str, stages: list[int], action: int) -> str:
    created = client.rollouts.CreateRollout(
        rollout_pb2.CreateRolloutRequest(
            feature="lane-assist",
            version=version,
            stages=[rollout_pb2.Stage(ppm=p, min_soak_seconds=0) for p in stages],
            gate=rollout_pb2.FailureGate(max_failure_ppm=50_000, min_sample=5, action=action),
        ),
        metadata=client.metadata,
    )
    client.rollouts.StartRollout(
        rollout_pb2.RolloutCommandRequest(rollout_id=created.rollout_id), metadata=client.metadata
    )
    return created.rollout_id


def _state(client: Client, rollout_id: str) -> int:
    got = client.rollouts.GetRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    return got.state


def _funnel_from_devices(fleet: SimulatedFleet, rollout_id: str, exposed: int) -> list[int]:
    """Devices that got at least as far as each funnel step, by what they sent."""
    furthest = [
        max((RANK.get(s, 0) for s in d.record.states_seen.get(rollout_id, set())), default=0)
        for d in fleet.devices
        if rollout_id in d.record.states_seen
    ]
    return [exposed] + [sum(r >= RANK[step] for r in furthest) for step in FUNNEL[1:]]


def _check_counts(r: report_pb2.RolloutReport, fleet: SimulatedFleet, rollout_id: str) -> None:
    devices = fleet.devices
    assert report_states(r) == dict(fleet.outcomes(rollout_id))
    steps = [s.devices for s in r.funnel if s.step != "USED"]
    assert steps == _funnel_from_devices(fleet, rollout_id, r.exposed)
    assert {c.key: c.count for c in r.failures_by_reason} == dict(fleet.failure_reasons(rollout_id))
    # Each device's events once, however often it re-sent them.
    assert r.events_ingested == sum(d.record.events_by_rollout.get(rollout_id, 0) for d in devices)
    samples = sum(d.record.health_samples.get(rollout_id, 0) for d in devices)
    crashes = sum(d.record.crashes.get(rollout_id, 0) for d in devices)
    assert (r.health.exposed.samples, r.health.exposed.crashes) == (samples, crashes)
    assert not r.health.HasField("control")
    assert "no holdout configured" in r.health.note
    failed_by_model = Counter(
        d.profile.model for d in devices if rollout_id in d.record.failed_reason
    )
    active_by_model = Counter(
        d.profile.model for d in devices if d.record.last_state.get(rollout_id) == "ACTIVE"
    )
    exposed_by_model = Counter(
        d.profile.model for d in devices if rollout_id in d.record.last_state
    )
    cohorts = {c.value: c for c in r.cohorts if c.dimension == "model"}
    for model in MODELS:
        assert cohorts[model].failed == failed_by_model[model], model
        assert cohorts[model].active == active_by_model[model], model
        assert cohorts[model].exposed == exposed_by_model[model], model
    for f in r.failures_by_cohort:
        if f.dimension == "model":
            assert f.devices == failed_by_model[f.value]
    installed = sum(
        1 for d in devices if {"INSTALLED", "ACTIVE"} & d.record.states_seen.get(rollout_id, set())
    )
    latency = {x.name: x for x in r.latencies}
    assert latency["install"].devices == installed
    assert 0 < latency["install"].p50_seconds <= latency["install"].p90_seconds
    assert latency["install"].p90_seconds <= latency["install"].p99_seconds
    if r.adoption_curve:
        assert r.adoption_curve[-1].installed == installed


def test_every_count_of_the_report_equals_what_the_devices_did(
    stack: DevStack, tmp_path: Path
) -> None:
    fleet = _fleet(stack, tmp_path, 60, crash_rates={"niro": 1.0}, duplicate_every=3)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        # Churn: six devices are offline when the rollout starts.
        away = [d.device_id for d in fleet.devices[:6]]
        fleet.disconnect(away)
        first = _start(client, "1.0.0", [1_000_000], rollout_pb2.GATE_ACTION_PAUSE)
        wait_for(
            lambda: report_states(report(client, first)).get("ACTIVE") == 54,
            what="the 54 online devices to be active",
        )
        r = report(client, first)
        assert r.stragglers.unreachable == 6
        assert r.stragglers.reachable_not_applied == 0
        gap = {c.key: c.count for c in r.exposure_gap.reasons}
        assert gap["offline"] == 6 and gap["not_yet_notified"] == 6
        assert sum(c.count for c in r.stragglers.last_seen) == 6
        assert _state(client, first) == rollout_pb2.ROLLOUT_STATE_RUNNING

        fleet.reconnect(away)
        wait_for(
            lambda: _state(client, first) == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="the first rollout to complete once the offline devices are back",
        )
        wait_for(
            lambda: report(client, first).health.exposed.samples == 60,
            what="a health sample from every active device",
        )
        r = report(client, first)
        assert report_states(r) == {"ACTIVE": 60}
        assert r.stragglers.unreachable == r.stragglers.reachable_not_applied == 0
        _check_counts(r, fleet, first)

        publish(client, stack, tmp_path, "2.0.0", size=12_000)
        second = _start(client, "2.0.0", [500_000, 1_000_000], rollout_pb2.GATE_ACTION_ROLLBACK)
        wait_for(
            lambda: _state(client, second) == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
            what="the failing rollout to roll back",
        )
        exposed = report(client, second).exposed
        wait_for(
            lambda: report_states(report(client, second)) == {"ROLLED_BACK": exposed},
            what="every exposed device to report ROLLED_BACK",
        )
        r = report(client, second)
        _check_counts(r, fleet, second)
        assert {c.key for c in r.failures_by_reason} == {"INSTALL_FAILED"}
        assert r.adoption_curve[-1].reverted == exposed
        assert [e.action for e in r.timeline][-1] in ("rollback", "gate")

        # Duplicates were sent and are in no count.
        assert sum(d.record.duplicates_sent for d in fleet.devices) > 0
        stored = report(client, first).events_ingested + r.events_ingested
        assert stored == sum(d.record.events_sent for d in fleet.devices)

        # Across rollouts: every device runs 1.0.0 again.
        feature = client.reports.GetFeatureReport(
            report_pb2.GetFeatureReportRequest(feature="lane-assist"), metadata=client.metadata
        )
        now = {v.version: v.devices_now for v in feature.versions}
        assert now == {"1.0.0": 60, "2.0.0": 0}
        assert [x.rollout_id for x in feature.rollouts] == [first, second]
    finally:
        client.close()
        fleet.stop()


def _ota(stack: DevStack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTA_SERVER": stack.server, "OTA_TOKEN": stack.admin_token}
    done = subprocess.run(
        [str(BIN / "ota"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def _headless(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium with every network path closed: a proxy to nowhere, no background fetches."""
    return subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--proxy-server=127.0.0.1:9",
            "--proxy-bypass-list=<-loopback>",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_report_forms_agree_and_the_html_opens_offline_in_chromium(
    stack: DevStack, tmp_path: Path
) -> None:
    chromium = _chromium()
    fleet = _fleet(stack, tmp_path, 48, crash_rates={"niro": 0.5}, duplicate_every=5)
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        first = _start(client, "1.0.0", [250_000, 1_000_000], rollout_pb2.GATE_ACTION_PAUSE)
        wait_for(
            lambda: _state(client, first) == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="the first rollout to complete",
        )
        publish(client, stack, tmp_path, "2.0.0", size=12_000)
        second = _start(client, "2.0.0", [500_000, 1_000_000], rollout_pb2.GATE_ACTION_ROLLBACK)
        wait_for(
            lambda: _state(client, second) == rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
            what="the failing rollout to roll back",
        )
        exposed = report(client, second).exposed
        wait_for(
            lambda: report_states(report(client, second)) == {"ROLLED_BACK": exposed},
            what="every exposed device to report ROLLED_BACK",
        )
        service = report(client, second)
        expected = figures(service)

        # JSON: the ReportService message itself.
        from_json = Parse(
            _ota(stack, "report", second, "--format", "json").stdout, report_pb2.RolloutReport()
        )
        assert figures(from_json) == expected
        assert from_json.timeline == service.timeline

        # CSV: the header and every figure, as section,key,value rows.
        rows = list(
            csv.reader(io.StringIO(_ota(stack, "report", second, "--format", "csv").stdout))
        )
        assert rows[0] == ["section", "key", "value"]
        assert [tuple(r) for r in rows[1:]] == [*header(service), *expected]

        # The terminal table prints the same numbers, under human labels.
        console = Console(record=True, width=240)
        render_table(service, console)
        text = console.export_text()
        for section, key, value in expected:
            if section in {"funnel", "failure", "state", "exposure", "gap"}:
                assert re.search(
                    rf"│ (· )?{re.escape(label(key))}\s+│\s+{re.escape(value)} │", text
                ), (
                    section,
                    key,
                    value,
                )
        for c in service.cohorts:
            line = (
                rf"│ {c.dimension} {re.escape(c.value)}\s+│\s+{c.exposed} │\s+{c.installed} │"
                rf"\s+{c.active} │\s+{c.used} │\s+{c.failed} │"
            )
            assert re.search(line, text), c
        assert "Rolled back by the gate" in text

        # HTML: one file, opened offline; the charts drew and show the JSON's numbers.
        page = tmp_path / "report.html"
        _ota(stack, "report", second, "--format", "html", "--out", str(page))
        dom = _headless(chromium, tmp_path / "chrome-dom", "--dump-dom", page.as_uri())
        assert dom.returncode == 0, dom.stderr
        assert "Uncaught" not in dom.stderr, dom.stderr
        assert "ERROR:CONSOLE" not in dom.stderr, dom.stderr
        assert page.stat().st_size <= 1_500_000
        assert dom.stdout.count('class="uplot') >= 2  # the curve and the usage charts drew
        for part in ("outcome", "funnel", "exposure", "stage-funnel", "failures", "segments"):
            assert f'id="{part}"' in dom.stdout, part
        shown = dict(
            ((s, k), v)
            for s, k, v in re.findall(
                r"data-figure=\"([^\"|]*)\|([^\"]*)\"[^>]*>([^<]*)<", dom.stdout
            )
        )
        assert shown, "no figures in the page"
        by_key = {(s, k): v for s, k, v in [*header(service), *expected]}
        for (section, key), value in shown.items():
            figure = (html.unescape(section), html.unescape(key))
            assert by_key[figure] == html.unescape(value), figure
        assert shown[("exposure", "exposed")] == str(
            json.loads(_ota(stack, "report", second, "--format", "json").stdout)["exposed"]
        )

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "report.png"
        shot.unlink(missing_ok=True)
        taken = _headless(
            chromium,
            tmp_path / "chrome-shot",
            "--hide-scrollbars",
            "--window-size=1280,2200",
            f"--screenshot={shot}",
            page.as_uri(),
        )
        assert taken.returncode == 0, taken.stderr
        assert shot.stat().st_size > 10_000
        shutil.copy(page, ARTIFACTS / "report.html")
    finally:
        client.close()
        fleet.stop()
