"""Plans as code: every bad plan is refused with the field named; good plans mean what they say."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest

from ota.domain.plan import Gate, MaintenanceWindow, RolloutPlan
from ota.domain.plan_document import parse_plan_document
from ota.errors import InvalidArgument
from ota.rollout.commands import check_edit

GOOD = """
feature: lane-assist
version: 2.0.0
selector: 'model in (ev6, ev9) and region = "eu"'
salt_from: r-00000001
holdout: 10%
approvers: [release-lead]
cohort: {name: internal, devices: [car-001, car-002], min_soak: 1h, advance: approval}
stages:
  - {exposure: 1%, min_soak: 30m, min_exposed: 5, deadline: 2h}
  - {ppm: 100000, advance: approval}
  - {exposure: 100%}
gates:
  - {metric: install_failure, max: 5%, min_sample: 5, action: pause}
  - {metric: crash_rate, max: 2%, versus_holdout: true, window: 1h, breaches_to_trip: 3,
     action: rollback}
  - {metric: offline_ratio, max: 30%, action: hold, observe_only: true}
maintenance_windows: [{days: [mon, tue, wed, thu], start: "01:00", end: "05:00"}]
blackout_dates: [2026-12-24, "2026-12-25"]
"""


def _doc(**changes: object) -> str:
    """GOOD as JSON with top-level fields replaced (None removes one)."""
    import yaml

    doc = yaml.safe_load(GOOD)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return json.dumps(doc, default=str)


def test_a_full_plan_reads_as_written() -> None:
    doc = parse_plan_document(GOOD)
    plan = doc.plan
    assert (doc.feature, doc.version) == ("lane-assist", "2.0.0")
    assert [s.ppm for s in plan.stages] == [0, 10_000, 100_000, 1_000_000]
    cohort = plan.stages[0]
    assert cohort.cohort is not None and cohort.cohort.devices == ("car-001", "car-002")
    assert (cohort.min_soak_seconds, cohort.advance, cohort.label) == (3600, "approval", "internal")
    first = plan.stages[1]
    assert (first.min_soak_seconds, first.min_exposed, first.deadline_seconds) == (1800, 5, 7200)
    assert plan.stages[2].advance == "approval"
    assert plan.holdout_ppm == 100_000
    assert plan.gates[1] == Gate(
        "crash_rate",
        20_000,
        window_seconds=3600,
        breaches_to_trip=3,
        action="rollback",
        versus_holdout=True,
    )
    assert plan.gates[2].observe_only and plan.gates[2].action == "hold"
    assert plan.windows == (MaintenanceWindow((0, 1, 2, 3), 60, 300),)
    assert plan.blackout_dates == (date(2026, 12, 24), date(2026, 12, 25))
    assert plan.approvers == ("release-lead",)
    assert plan.salt_from == "r-00000001"
    # The stored form gives the same plan back, and JSON reads as YAML does.
    assert RolloutPlan.from_json(plan.stages_json(), plan.gate_json()) == plan
    assert parse_plan_document(_doc()).plan == plan


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("feature: [", "plan"),
        ("- just a list", "plan"),
        (_doc(colour="blue"), "colour"),
        (_doc(feature=None), "feature"),
        (_doc(selector="model ~ ev6"), "selector"),
        (_doc(stages=[]), "stages"),
        (_doc(stages=[{"exposure": "10%"}, {"exposure": "5%"}]), "stages[1].exposure"),
        (_doc(stages=[{"exposure": "10%"}, {"ppm": 50_000}]), "stages[1].ppm"),
        (_doc(stages=[{"exposure": "10%", "soak": "1h"}]), "stages[0].soak"),
        (_doc(stages=[{"exposure": "10%", "ppm": 100_000}]), "stages[0]"),
        (_doc(stages=[{"exposure": "120%"}]), "stages[0].exposure"),
        (_doc(stages=[{"exposure": "0%"}]), "stages[0].exposure"),
        (_doc(stages=[{"exposure": "ten"}]), "stages[0].exposure"),
        (_doc(stages=[{"exposure": "10%", "min_soak": "soon"}]), "stages[0].min_soak"),
        (_doc(stages=[{"exposure": "10%", "deadline": -5}]), "stages[0].deadline"),
        (_doc(stages=[{"exposure": "10%", "min_exposed": -1}]), "stages[0].min_exposed"),
        (_doc(stages=[{"exposure": "10%", "advance": "whenever"}]), "stages[0].advance"),
        (_doc(stages=[{"exposure": "100%", "advance": "approval"}]), "stages[0].advance"),
        (_doc(holdout="60%"), "holdout"),
        (_doc(holdout=600_000), "holdout"),
        (_doc(gates=[{"max": "5%"}]), "gates[0].metric"),
        (_doc(gates=[{"metric": "latency", "max": "5%"}]), "gates[0].metric"),
        (_doc(gates=[{"metric": "crash_rate"}]), "gates[0].max"),
        (_doc(gates=[{"metric": "crash_rate", "max": "5%", "action": "panic"}]), "gates[0].action"),
        (
            _doc(gates=[{"metric": "crash_rate", "max": "5%", "min_sample": 0}]),
            "gates[0].min_sample",
        ),
        (
            _doc(gates=[{"metric": "crash_rate", "max": "5%", "breaches_to_trip": 0}]),
            "gates[0].breaches_to_trip",
        ),
        (
            _doc(gates=[{"metric": "install_failure", "max": "5%", "versus_holdout": True}]),
            "gates[0].versus_holdout",
        ),
        (
            _doc(
                holdout=None, gates=[{"metric": "crash_rate", "max": "5%", "versus_holdout": True}]
            ),
            "gates[0].versus_holdout",
        ),
        (_doc(gates=[{"metric": "crash_rate", "max": "5%", "muted": True}]), "gates[0].muted"),
        (_doc(cohort={"name": "internal"}), "cohort"),
        (_doc(cohort={"devices": ["a"], "label": "fleet=internal"}), "cohort"),
        (_doc(cohort={"label": "internal"}), "cohort.label"),
        (
            _doc(maintenance_windows=[{"days": ["someday"], "start": "01:00", "end": "02:00"}]),
            "maintenance_windows[0].days[0]",
        ),
        (
            _doc(maintenance_windows=[{"days": ["mon"], "start": "25:00", "end": "02:00"}]),
            "maintenance_windows[0].start",
        ),
        (
            _doc(maintenance_windows=[{"days": ["mon"], "start": "01:00"}]),
            "maintenance_windows[0].end",
        ),
        (_doc(blackout_dates=["christmas"]), "blackout_dates[0]"),
        (_doc(approvers=[""]), "approvers[0]"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(text)
    assert e.value.field == field, str(e.value)


def test_a_decreasing_stage_after_a_cohort_is_named_as_the_document_numbers_it() -> None:
    text = _doc(stages=[{"exposure": "10%"}, {"exposure": "20%"}, {"exposure": "15%"}])
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(text)
    assert str(e.value) == "stages[2].exposure: exposure must not decrease: 15% after 20%"


def test_maintenance_windows_and_blackout_dates() -> None:
    plan = parse_plan_document(GOOD).plan
    monday_2am = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    assert plan.exposure_allowed(monday_2am)
    assert not plan.exposure_allowed(monday_2am.replace(hour=5))  # the end is exclusive
    assert not plan.exposure_allowed(datetime(2026, 11, 27, 2, 0, tzinfo=UTC))  # a Friday
    assert not plan.exposure_allowed(datetime(2026, 12, 24, 2, 0, tzinfo=UTC))  # Thursday, blackout
    # A window that wraps midnight belongs to the day it starts on.
    night = MaintenanceWindow((4,), 22 * 60, 4 * 60)  # Friday 22:00 to Saturday 04:00
    assert night.contains(datetime(2026, 11, 27, 23, 0, tzinfo=UTC))
    assert night.contains(datetime(2026, 11, 28, 3, 0, tzinfo=UTC))
    assert not night.contains(datetime(2026, 11, 27, 3, 0, tzinfo=UTC))


@pytest.mark.parametrize(
    ("bad", "sample", "control_bad", "control_sample", "tripped"),
    [
        (3, 20, 2, 20, False),  # 15% vs 10%: 5 points, not more than 5%
        (4, 20, 2, 20, True),  # 20% vs 10%
        (4, 20, 2, 4, False),  # the holdout is below its minimum sample
        (20, 20, 0, 0, False),
    ],
)
def test_a_health_gate_against_the_holdout_judges_the_difference(
    bad: int, sample: int, control_bad: int, control_sample: int, tripped: bool
) -> None:
    gate = Gate("crash_rate", 50_000, min_sample=5, versus_holdout=True)
    result = gate.breached(bad, sample, control_bad=control_bad, control_sample=control_sample)
    assert result is tripped


def test_edits_change_only_future_stages_and_nothing_that_decides_who_is_compared() -> None:
    old = parse_plan_document(_doc(cohort=None)).plan
    later = _doc(
        cohort=None, stages=[{"exposure": "1%"}, {"exposure": "50%"}, {"exposure": "100%"}]
    )
    new = parse_plan_document(later).plan
    check_edit(old, new, current_stage=-1)  # a DRAFT: every stage is in the future
    with pytest.raises(InvalidArgument) as e:
        check_edit(old, new, current_stage=0)  # stage 1 ran with other settings
    assert e.value.field == "stages[0]"
    same_start = _doc(
        cohort=None,
        stages=[
            {"exposure": "1%", "min_soak": "30m", "min_exposed": 5, "deadline": "2h"},
            {"exposure": "20%"},
            {"exposure": "100%"},
        ],
    )
    check_edit(old, parse_plan_document(same_start).plan, current_stage=0)
    with pytest.raises(InvalidArgument) as e:
        check_edit(old, parse_plan_document(same_start).plan, current_stage=1)
    assert e.value.field == "stages[1]"
    with pytest.raises(InvalidArgument) as e:
        check_edit(old, parse_plan_document(_doc(cohort=None, holdout="5%")).plan, -1)
    assert e.value.field == "holdout"
    with pytest.raises(InvalidArgument) as e:
        check_edit(old, parse_plan_document(_doc(cohort=None, salt_from="r-2")).plan, -1)
    assert e.value.field == "salt_from"


# -- shares carry their unit ----------------------------------------------------------------

BARE = "feature: f\nversion: '1'\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (BARE + "stages: [{exposure: 50}, {exposure: 100}]", "stages[0].exposure"),
        (BARE + "stages: [{exposure: 10%}, {exposure: 40}]", "stages[1].exposure"),
        (BARE + "stages: [{exposure: '50'}]", "stages[0].exposure"),
        (BARE + "stages: [{exposure: 0.5}]", "stages[0].exposure"),
        (BARE + "holdout: 10\nstages: [{exposure: 100%}]", "holdout"),
        (
            BARE + "stages: [{exposure: 100%}]\ngates: [{metric: install_failure, max: 5}]",
            "gates[0].max",
        ),
    ],
)
def test_a_bare_number_is_refused_naming_the_field_as_written(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(text)
    assert e.value.field == field
    message = str(e.value)
    assert "\n" not in message and "has no unit" in message
    assert "%" in message and "ppm" in message  # the accepted forms


def test_the_message_shows_the_number_with_its_units() -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(BARE + "stages: [{exposure: 10%}, {exposure: 40}]")
    assert str(e.value) == (
        "stages[1].exposure: 40 has no unit: write a percentage like 40%, "
        "or parts per million like {ppm: 400000} or 400000ppm"
    )


def test_a_bare_fraction_is_also_shown_as_the_percentage_it_would_be() -> None:
    # `max: 0.05` is often meant as 5%: the message must not only suggest 0.05%.
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(
            BARE + "stages: [{exposure: 100%}]\ngates: [{metric: install_failure, max: 0.05}]"
        )
    assert str(e.value) == (
        "gates[0].max: 0.05 has no unit: write a percentage like 0.05%, "
        "or parts per million like {ppm: 500} or 500ppm (as a fraction, 0.05 is 5%)"
    )


@pytest.mark.parametrize("ppm", ["1000001ppm", "1000000000000ppm", "9" * 5000 + "ppm"])
def test_too_many_ppm_is_out_of_range_not_malformed(ppm: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(BARE + f"stages: [{{exposure: {ppm}}}]")
    assert e.value.field == "stages[0].exposure"
    assert str(e.value).startswith("stages[0].exposure: must be between 0% and 100%")


def test_every_form_with_a_unit_means_the_same_share() -> None:
    text = BARE + (
        "holdout: {ppm: 50000}\n"
        "stages: [{exposure: 0.5%}, {exposure: {ppm: 100000}}, {exposure: 500000ppm},"
        " {ppm: 700000}, {exposure: 100%}]\n"
        "gates: [{metric: install_failure, max: 2.5%}, {metric: offline_ratio, max: 30000ppm}]\n"
    )
    plan = parse_plan_document(text).plan
    assert [s.ppm for s in plan.stages] == [5_000, 100_000, 500_000, 700_000, 1_000_000]
    assert plan.holdout_ppm == 50_000
    assert [g.max_ppm for g in plan.gates] == [25_000, 30_000]


@pytest.mark.parametrize(
    ("share", "field"),
    [
        ("{ppm: 10%}", "stages[0].exposure.ppm"),
        ("{ppm: 1000001}", "stages[0].exposure.ppm"),
        ("{percent: 10}", "stages[0].exposure.percent"),
        ("0.00001%", "stages[0].exposure"),
        ("10 percent", "stages[0].exposure"),
        ("-5%", "stages[0].exposure"),
        ("nan%", "stages[0].exposure"),
        ("12.5ppm", "stages[0].exposure"),
    ],
)
def test_a_share_that_is_not_one_is_refused(share: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(BARE + f"stages: [{{exposure: {share}}}]")
    assert e.value.field == field, str(e.value)


# -- bounds -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "gate", "field"),
    [
        ("min_soak: 50000d", "", "stages[0].min_soak"),
        ("min_soak: 366d", "", "stages[0].min_soak"),
        ("deadline: 99999999999", "", "stages[0].deadline"),
        ("min_soak: 99999999999999999999s", "", "stages[0].min_soak"),
        ("min_exposed: 5000000000", "", "stages[0].min_exposed"),
        ("", "min_sample: 5000000000", "gates[0].min_sample"),
        ("", "window: 400d", "gates[0].window"),
        ("", "breaches_to_trip: 1000000", "gates[0].breaches_to_trip"),
        ("name: " + "n" * 200, "", "stages[0].name"),
    ],
)
def test_numbers_out_of_bounds_are_refused_naming_the_field(
    stage: str, gate: str, field: str
) -> None:
    text = (
        BARE + f"stages: [{{exposure: 100%, {stage}}}]\n"
        if stage
        else BARE + ("stages: [{exposure: 100%}]\n")
    )
    if gate:
        text += f"gates: [{{metric: install_failure, max: 5%, {gate}}}]\n"
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(text)
    assert e.value.field == field, str(e.value)


def test_the_largest_values_in_bounds_are_accepted() -> None:
    plan = parse_plan_document(
        BARE + "stages: [{exposure: 100%, min_soak: 365d, deadline: 31536000,"
        " min_exposed: 100000000}]\n"
        "gates: [{metric: install_failure, max: 100%, min_sample: 100000000, window: 365d,"
        " breaches_to_trip: 1000}]\n"
    ).plan
    assert plan.stages[0].min_soak_seconds == plan.stages[0].deadline_seconds == 31_536_000
    assert plan.gates[0].min_sample == 100_000_000


def test_long_lists_are_refused() -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(BARE + "stages: [" + ", ".join(["{exposure: 100%}"] * 101) + "]")
    assert e.value.field == "stages"


@pytest.mark.parametrize(
    "text",
    [
        "[" * 3000,
        "{a: " * 3000,
        BARE + "stages:\n" + "".join("  " * i + "- \n" for i in range(40)),
        "a: " + "9" * 5000,
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(
            f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
            for i in range(6)
        ),
        "x: '" + "y" * 70_000 + "'",
        "blackout: 2026-13-45",
    ],
    ids=["brackets", "braces", "block", "long-int", "alias-bomb", "size", "bad-date"],
)
def test_a_document_too_big_deep_or_odd_is_one_error_about_the_plan(text: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_plan_document(text)
    assert e.value.field == "plan"
    assert "\n" not in str(e.value)


def test_a_plan_stored_before_the_bounds_still_reads_and_goes_on_the_wire() -> None:
    from ota.api.convert import rollout as rollout_message
    from ota.store.models import RolloutRow

    stages = json.dumps(
        [
            {
                "ppm": 1_000_000,
                "min_soak_seconds": 50_000 * 86_400,
                "min_exposed": 5_000_000_000,
                "deadline_seconds": 0,
                "advance": "auto",
                "name": "n" * 300,
            }
        ]
    )
    rest = json.dumps(
        {
            "gates": [
                {
                    "metric": "install_failure",
                    "max_ppm": 50_000,
                    "min_sample": 5_000_000_000,
                    "window_seconds": 0,
                    "breaches_to_trip": 1,
                    "action": "pause",
                    "observe_only": False,
                    "versus_holdout": False,
                }
            ]
        }
    )
    plan = RolloutPlan.from_json(stages, rest)
    assert plan.stages[0].min_exposed == 5_000_000_000  # read as written
    with pytest.raises(InvalidArgument):  # but not accepted as new input
        RolloutPlan(plan.stages, plan.gates)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    row = RolloutRow(
        rollout_id="r-1",
        feature="f",
        version="1",
        bundle_name="bundles/f/1",
        stages_json=stages,
        gate_json=rest,
        state="DRAFT",
        salt_hex="00",
        created_at=now,
        updated_at=now,
    )
    message = rollout_message(row)
    assert message.stages[0].min_exposed == 2**32 - 1
    assert message.gate.min_sample == 2**32 - 1
