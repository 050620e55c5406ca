"""The web dashboard in headless Chromium, against a real control plane, broker and fleet.

Sign-in with a viewer token (and refusal without one), every page loading
without console errors, a rollout page following its rollout live (no reload),
every number on it equal to the JSON report, the holdout on its own line, and a
rolled-back rollout saying why at the top. Screenshots of each page at 1400 px
and 390 px go to the test artifacts (OTA_TEST_ARTIFACTS, else test-artifacts/).
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from google.protobuf.json_format import MessageToJson, Parse

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, HealthProfile, compose_fleet
from ota.client import Client
from ota.devstack import DevStack
from ota.reports.figures import figures, header
from ota.v1 import report_pb2, rollout_pb2, token_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.scenario import MODELS, REGIONS, create_from_plan, get_rollout, publish, wait_for
from tests.e2e.scenario import report as grpc_report

pytestmark = pytest.mark.e2e

ARTIFACTS = (
    Path(
        os.environ.get("OTA_TEST_ARTIFACTS")
        or Path(__file__).resolve().parents[2] / "test-artifacts"
    )
    / "dashboard"
)
# The system's Chromium, with every background fetch off: the pages need no network.
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WIDTHS = (1400, 390)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


class Errors:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self, page: Any) -> None:
        self.seen: list[str] = []
        page.on("console", lambda m: self.seen.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.seen.append(str(e)))

    def none(self, where: str) -> None:
        assert not self.seen, f"{where}: {self.seen}"


def _json_report(client: Client, rollout_id: str) -> report_pb2.RolloutReport:
    """The report as its JSON form, parsed back (what `ota report --format json` prints)."""
    text = MessageToJson(grpc_report(client, rollout_id), preserving_proto_field_name=True)
    return Parse(text, report_pb2.RolloutReport())


def _shown(page: Any) -> dict[str, str]:
    values: dict[str, str] = page.eval_on_selector_all(
        "#report [data-figure]",
        "els => Object.fromEntries(els.map(e => [e.dataset.figure, e.textContent]))",
    )
    return values


def _expected(r: report_pb2.RolloutReport) -> dict[str, str]:
    return {f"{s}|{k}": v for s, k, v in [*header(r), *figures(r)]}


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _mismatches(page: Any, client: Client, rollout_id: str) -> list[str]:
    shown, expected = _shown(page), _expected(_json_report(client, rollout_id))
    return [
        f"{k}: page {v!r}, JSON {expected.get(k)!r}"
        for k, v in shown.items()
        if expected.get(k) != v
    ]


def _shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        page.wait_for_timeout(300)  # the charts redraw on resize (debounced)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{name} at {width} px is {overflow} px wider than the window"
        page.screenshot(path=str(ARTIFACTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": WIDTHS[0], "height": 900})


def _plan(version: str, stages: str, gates: str = "") -> str:
    return f"feature: lane-assist\nversion: {version}\nholdout: 20%\nstages:\n{stages}" + (
        f"gates:\n{gates}" if gates else ""
    )


def test_dashboard_signs_in_follows_a_rollout_live_and_states_a_rollback(
    stack: DevStack, tmp_path: Path, browser: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = SimulatedFleet(
        compose_fleet(40, models=MODELS, regions=REGIONS, firmware="4.2.0"),
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile.parse(["ev9@2.0.0=1.0"]),
            health=HealthProfile(use_rates={("ev6", "*"): 0.8, ("ev9", "*"): 0.3}),
            health_interval=1.0,
        ),
    )
    fleet.start()
    client = Client.connect(stack.server, stack.admin_token)
    base = stack.dashboard_url.rstrip("/")
    try:
        publish(client, stack, tmp_path, "1.0.0")
        publish(client, stack, tmp_path, "2.0.0", size=12_000)
        viewer = client.tokens.CreateToken(
            token_pb2.CreateTokenRequest(
                token=token_pb2.Token(display_name="pm-anna", role="viewer")
            ),
            metadata=client.metadata,
        ).secret
        context = browser.new_context(viewport={"width": WIDTHS[0], "height": 900})
        page = context.new_page()
        errors = Errors(page)

        # Refused: no session, a wrong token, no token.
        page.goto(base + "/")
        assert page.url.startswith(base + "/signin")
        assert context.request.get(base + "/rollouts/r-x/events").status == 401
        page.fill("input[name=token]", "ota_" + "0" * 64)
        with page.expect_response(base + "/signin") as refused:
            page.click("button[type=submit]")
        assert refused.value.status == 401
        assert "not valid" in page.inner_text(".error")
        _shoot(page, "signin")
        assert context.request.post(base + "/signin", form={"token": ""}).status == 401
        assert (
            context.request.post(
                base + "/signin", form={"token": f"device:{fleet.devices[0].device_id}:x"}
            ).status
            == 401
        )
        assert context.cookies() == []
        errors.seen.clear()  # the 401 answers above are logged as failed loads

        # A viewer signs in: an HttpOnly, SameSite=Strict session cookie, no token in URLs.
        page.fill("input[name=token]", viewer)
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert not cookie["secure"]  # plain HTTP here; Secure over TLS
        assert viewer not in cookie["value"]
        assert "pm-anna" in page.inner_text("nav")

        first = create_from_plan(
            client,
            _plan("1.0.0", "  - {exposure: 30%, min_soak: 3s}\n  - {exposure: 100%}\n"),
        ).rollout_id
        page.goto(f"{base}/rollouts/{first}")
        page.wait_for_selector("#live.on")
        assert page.inner_text("[data-figure='exposure|exposed']") == "0"
        metrics = urllib.request.urlopen(stack.metrics_url, timeout=30).read().decode()
        assert "ota_dashboard_sessions 1.0" in metrics
        assert "ota_dashboard_live_rollouts 1.0" in metrics
        page.evaluate("window.notReloaded = true")
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=first), metadata=client.metadata
        )
        # Figures change while the rollout advances, pushed to the open page.
        expect(page.locator("[data-figure='exposure|exposed']").first).not_to_have_text(
            "0", timeout=60_000
        )
        expect(page.locator("[data-figure='exposure|applied']").first).not_to_have_text(
            "0", timeout=60_000
        )
        wait_for(
            lambda: get_rollout(client, first).state == rollout_pb2.ROLLOUT_STATE_COMPLETED,
            what="the first rollout to complete",
            timeout=120,
        )
        expect(page.locator("#report h1 .state")).to_have_text("completed", timeout=60_000)
        assert page.evaluate("window.notReloaded") is True
        assert int(page.get_attribute("#report", "data-updates") or 0) >= 2

        # Every number on the page equals the JSON report (once ingest has caught up).
        wait_for(
            lambda: not _mismatches(page, client, first),
            what="the live page to show the JSON report's figures",
            timeout=90,
        )
        shown = _shown(page)
        assert len(shown) > 100
        r = _json_report(client, first)
        assert r.exposure_gap.holdout > 0
        # The holdout has its own line, and the stage's target leaves it out.
        assert shown["exposure|holdout"] == str(r.exposure_gap.holdout)
        assert r.exposure_gap.holdout == 40 - r.exposed
        status = get_rollout(client, first)  # what `ota rollout status` prints from
        assert (status.eligible - status.holdout, status.holdout) == (
            r.exposed,
            r.exposure_gap.holdout,
        )
        gap = {c.key: c.count for c in r.exposure_gap.reasons}
        assert gap["rounding"] == 0 and r.target_exposed == r.exposed
        holdout_row = page.locator("#exposure tr", has_text="holdout (never exposed)")
        assert holdout_row.count() == 1
        assert page.locator("#outcome").count() == 0
        errors.none("rollout page")
        _shoot(page, "rollout")

        # The rollback: the page says so at the top, with the gate's figures and the time.
        second = create_from_plan(
            client,
            _plan(
                "2.0.0",
                "  - {exposure: 50%}\n  - {exposure: 100%}\n",
                "  - {metric: install_failure, max: 5%, min_sample: 3, action: rollback}\n",
            ),
        ).rollout_id
        page.goto(f"{base}/rollouts/{second}")
        page.wait_for_selector("#live.on")
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=second), metadata=client.metadata
        )
        page.wait_for_selector("#outcome", timeout=90_000)
        banner = page.inner_text("#outcome")
        assert "Rolled back by the gate" in banner
        assert "install-failure gate tripped" in banner
        outcome = _json_report(client, second).outcome
        assert outcome.action == "rollback"
        assert page.inner_text("[data-figure='outcome|time']") == (
            outcome.time.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        top = page.locator("#outcome").bounding_box()
        first_card = page.locator("#funnel").bounding_box()
        assert top is not None and first_card is not None and top["y"] < first_card["y"]
        exposed = _json_report(client, second).exposed
        wait_for(
            lambda: (
                {c.key: c.count for c in _json_report(client, second).current_states}
                == {"ROLLED_BACK": exposed}
            ),
            what="every exposed device to report ROLLED_BACK",
        )
        wait_for(
            lambda: not _mismatches(page, client, second),
            what="the rolled-back page to show the JSON report's figures",
            timeout=90,
        )
        # Nobody runs it: installed-then-reverted and failed, never "applied".
        shown = _shown(page)
        assert shown["exposure|applied"] == "0"
        assert int(shown["exposure|reverted"]) + int(shown["gap|failed"]) == exposed
        assert int(shown["gap|failed"]) > 0
        errors.none("rolled-back page")
        _shoot(page, "rollout-rolled-back")

        # The other pages: the list (filtered), a feature, the fleet, a device.
        page.goto(f"{base}/?feature=lane-assist&state=ROLLED_BACK")
        assert page.locator("#rollouts tr[data-rollout]").count() == 1
        assert page.locator(f"tr[data-rollout='{second}']").count() == 1
        # Assets come from the control plane, under hashed names, cached for good.
        for src in page.eval_on_selector_all("script[src]", "els => els.map(e => e.src)"):
            asset = context.request.get(src)
            assert asset.status == 200 and src.startswith(base + "/static/")
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert context.request.get(base + "/rollouts/r-nope/events").status == 404
        assert context.request.get(base + "/rollouts/r-nope").status == 404
        page.goto(base + "/")
        assert page.locator("#rollouts tr[data-rollout]").count() == 2
        errors.none("rollouts page")
        _shoot(page, "rollouts")
        page.goto(f"{base}/features/lane-assist")
        page.wait_for_selector("[data-chart=versions] canvas")
        assert page.inner_text("[data-figure='devices_now|1.0.0']") == str(
            40 - r.exposure_gap.holdout
        )
        errors.none("feature page")
        _shoot(page, "feature")
        page.goto(base + "/fleet")
        assert page.inner_text("#fleet-devices") == "40"
        errors.none("fleet page")
        _shoot(page, "fleet")
        device = fleet.devices[0].device_id
        page.fill("input[name=device]", device)
        page.click("form.filters button")
        page.wait_for_url(f"{base}/devices/{device}")
        assert page.locator("#timeline tr").count() > 5
        errors.none("device page")
        _shoot(page, "device")

        # Signing out ends the session: the pages ask to sign in again.
        page.click("nav form button")
        page.wait_for_url(base + "/signin")
        page.goto(f"{base}/rollouts/{first}")
        assert page.url.startswith(base + "/signin")
        context.close()
        # The token went in a form body once: in no URL, no log line.
        assert viewer not in caplog.text
        assert "dashboard sign-in: pm-anna (viewer)" in caplog.text
    finally:
        client.close()
        fleet.stop()


def test_dashboard_over_tls_marks_its_cookie_secure_and_logs_no_token(
    tmp_path: Path, broker: BrokerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stack = DevStack.start(tmp_path / "stack", broker=endpoint(broker), tls=True)
    try:
        assert stack.pki is not None
        url = urlsplit(stack.dashboard_url)
        assert url.scheme == "https"
        tls = ssl.create_default_context(cafile=str(stack.pki.ca_cert))

        def post(token: str) -> http.client.HTTPResponse:
            conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=tls)
            conn.request(
                "POST",
                "/signin",
                body=urlencode({"token": token, "next": "/fleet"}),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            return conn.getresponse()

        refused = post("ota_" + "1" * 64)
        assert refused.status == 401
        assert refused.getheader("Set-Cookie") is None
        signed_in = post(stack.admin_token)
        assert signed_in.status == 303
        assert signed_in.getheader("Location") == "/fleet"
        cookie = signed_in.getheader("Set-Cookie") or ""
        assert "; Secure" in cookie and "; HttpOnly" in cookie and "SameSite=strict" in cookie
        # A plain-HTTP client gets no page from the TLS listener.
        plain = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/signin")
            plain.getresponse().read()
        assert stack.admin_token not in caplog.text
        assert "1" * 64 not in caplog.text
    finally:
        stack.stop()
