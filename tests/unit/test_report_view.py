"""What a page shows of a report: labels, the outcome, short key ids, the curve's resolution."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ota.reports.figures import MAX_LABELS, OTHER_LABELS, figures, short_keyid, when
from ota.reports.labels import label, segment
from ota.reports.model import CURVE_POINTS, LabelSegment, bounded_labels, fit_resolution
from ota.reports.view import build_view
from ota.store.segments import LabelUsage
from ota.v1 import report_pb2, rollout_pb2
from ota.web.app import _safe_next


def _stamp(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _rolled_back() -> report_pb2.RolloutReport:
    event = rollout_pb2.RolloutEvent(
        time=_stamp(1_780_000_000),
        actor="engine",
        action="rollback",
        from_state=rollout_pb2.ROLLOUT_STATE_RUNNING,
        to_state=rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
        stage=0,
        reason="install-failure gate tripped: 7 of 31 finished devices failed (22.6%)",
    )
    return report_pb2.RolloutReport(
        rollout=rollout_pb2.Rollout(
            rollout_id="r-1",
            feature="lane-assist",
            version="2.0.0",
            state=rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
            current_stage=0,
            stages=[rollout_pb2.Stage(ppm=100_000), rollout_pb2.Stage(ppm=1_000_000)],
        ),
        eligible=200,
        target_exposed=20,
        exposed=31,
        signer_keyids=["ab" * 32],
        exposure_gap=report_pb2.ExposureGap(
            target=20,
            exposed=31,
            applied=0,
            holdout=17,
            reverted=24,
            reasons=[
                report_pb2.CountByKey(key=k, count=n)
                for k, n in (
                    ("not_yet_notified", 0),
                    ("in_progress", 0),
                    ("failed", 7),
                    ("reverted", 24),
                    ("offline", 0),
                    ("rounding", -11),
                )
            ],
        ),
        funnel=[report_pb2.FunnelStep(step="TARGETED", devices=31)],
        timeline=[event],
        outcome=event,
        data_time=_stamp(1_780_000_040),
        health=report_pb2.HealthComparison(exposed=report_pb2.HealthGroup(name="exposed")),
        stragglers=report_pb2.Stragglers(),
    )


def test_a_rolled_back_report_states_its_cause_first() -> None:
    view = build_view(_rolled_back())
    assert view.outcome is not None
    assert view.outcome.headline == "Rolled back by the gate at stage 1"
    cells = dict(view.outcome.cells)
    assert cells["cause"].value.startswith("install-failure gate tripped")
    assert cells["when"].value == "2026-05-28T20:26:40Z"
    assert view.data_time.value == "2026-05-28T20:27:20Z"  # to the second


def test_the_holdout_is_a_line_of_its_own_and_key_ids_are_short_on_screen() -> None:
    r = _rolled_back()
    view = build_view(r)
    exposure = next(t for t in view.tables if t.anchor == "exposure")
    rows = {row.label: row.cells[0] for row in exposure.rows}
    assert rows["holdout (never exposed)"].figure == "exposure|holdout"
    assert rows["holdout (never exposed)"].value == "17"
    assert rows["· installed, then reverted"].value == "24"
    assert view.signers == [("ab" * 6, "ab" * 32)]
    # The figures (CSV, JSON) keep the machine keys and the whole key id.
    assert ("exposure", "holdout", "17") in figures(r)
    assert short_keyid("ab" * 32) == "abababababab"


def test_machine_keys_read_as_words() -> None:
    assert label("not_yet_notified") == "not notified yet"
    assert label("INSTALL_FAILED") == "install failed"
    assert label("p50_seconds") == "median (s)"
    assert label("ev9") == "ev9"
    assert segment("model:ev9") == "model ev9"
    assert when(_stamp(0)) == ""


def test_the_curve_resolution_fits_the_rollout_length() -> None:
    assert fit_resolution(1) == 1
    assert fit_resolution(3 * 60) == 2  # a few minutes: seconds
    assert fit_resolution(2 * 3600) == 60  # hours: minutes
    assert fit_resolution(30 * 86_400) == 21_600  # a month: quarter days
    for span in (59, 600, 7_200, 100_000):
        assert span / fit_resolution(span) <= CURVE_POINTS


def test_sign_in_only_sends_you_back_to_a_path_of_the_dashboard() -> None:
    assert _safe_next("/rollouts/r-1") == "/rollouts/r-1"
    assert _safe_next("/fleet?token=x") == "/fleet"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "", None):
        assert _safe_next(bad) == "/"


def test_labels_past_the_first_fifty_are_summed_as_other() -> None:
    rows = [LabelUsage(f"site=s{i:02d}", i + 1, i, i // 2, 0) for i in range(60)]
    holdout = {"ring=beta": 100, "site=s00": 3}
    segments = bounded_labels(rows, holdout)
    assert len(segments) == MAX_LABELS + 1
    # The most devices first, exposed and holdout together: the holdout-only label leads.
    assert segments[0] == LabelSegment("ring=beta", 0, 0, 0, 100, 0)
    assert segments[1].label == "site=s59"
    other = segments[-1]
    assert other.label == OTHER_LABELS
    kept = {s.label for s in segments[:-1]}
    rest = [r for r in rows if r.label not in kept]
    assert len(rest) == 11 and "site=s00" not in kept
    assert other == LabelSegment(
        OTHER_LABELS,
        sum(r.exposed for r in rest),
        sum(r.applied for r in rest),
        sum(r.used for r in rest),
        3,
        0,
    )
    assert len(bounded_labels(rows[:5], {})) == 5  # under the bound: no "other" row


def test_the_label_table_shows_each_label_with_its_use_shares() -> None:
    r = _rolled_back()
    r.labels.extend(
        [
            report_pb2.LabelSegment(
                label="ring=beta", exposed=20, applied=18, used=5, holdout_devices=4, holdout_used=1
            ),
            report_pb2.LabelSegment(label=OTHER_LABELS, exposed=3),
        ]
    )
    table = next(t for t in build_view(r).tables if t.anchor == "labels")
    assert [row.label for row in table.rows] == ["ring=beta", "other labels"]
    values = {c.figure: c.value for row in table.rows for c in row.cells}
    assert values["label:ring=beta|used"] == "5"
    assert values["label:ring=beta|device_use_share"] == "25.0%"
    assert values["label:ring=beta|holdout_device_use_share"] == "25.0%"
    assert values["label:other|holdout_device_use_share"] == "0.0%"
    assert ("label:ring=beta", "holdout_devices", "4") in figures(r)
    assert label("holdout_device_use_share") == "share of holdout devices that used it"
