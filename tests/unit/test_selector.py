"""Eligibility selectors: parsing, matching and the errors users see."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ota.domain.selector import DeviceAttributes, Selector, Term
from ota.domain.version import Version
from ota.errors import InvalidArgument

EXAMPLE = 'model in (ev6, ev9) and region = "eu" and firmware >= 4.2'


def device(
    *,
    model: str = "ev6",
    region: str = "eu",
    firmware: str = "4.2",
    device_id: str = "VIN-WVWZZZ1JZXW000001",
    labels: dict[str, str] | None = None,
) -> DeviceAttributes:
    return DeviceAttributes(
        device_id=device_id, model=model, region=region, firmware=firmware, labels=labels or {}
    )


def matches(text: str, dev: DeviceAttributes) -> bool:
    return Selector.parse(text).matches(dev)


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def test_parse_design_example() -> None:
    assert Selector.parse(EXAMPLE).terms == (
        Term("model", "in", ("ev6", "ev9")),
        Term("region", "=", ("eu",)),
        Term("firmware", ">=", ("4.2",)),
    )


@pytest.mark.parametrize(
    ("text", "term"),
    [
        ("model = ev6", Term("model", "=", ("ev6",))),
        ("model=ev6", Term("model", "=", ("ev6",))),
        ("  model   !=   'ev6'  ", Term("model", "!=", ("ev6",))),
        ('region = "eu west"', Term("region", "=", ("eu west",))),
        ('region = ""', Term("region", "=", ("",))),
        ("device_id = VIN-WVWZZZ1JZXW000001", Term("device_id", "=", ("VIN-WVWZZZ1JZXW000001",))),
        ("labels.ring = beta", Term("labels.ring", "=", ("beta",))),
        ("labels.fleet/owner = acme:eu", Term("labels.fleet/owner", "=", ("acme:eu",))),
        ("model not in (ev6)", Term("model", "not in", ("ev6",))),
        ("model NOT IN (ev6,ev9)", Term("model", "not in", ("ev6", "ev9"))),
        ("model In ('ev 6', \"ev9\")", Term("model", "in", ("ev 6", "ev9"))),
        ("firmware > 4.9", Term("firmware", ">", ("4.9",))),
        ("firmware <= 4.10.1", Term("firmware", "<=", ("4.10.1",))),
        ("firmware < '5'", Term("firmware", "<", ("5",))),
        ("firmware = 4.2.0", Term("firmware", "=", ("4.2.0",))),
    ],
)
def test_parse_single_terms(text: str, term: Term) -> None:
    assert Selector.parse(text).terms == (term,)


def test_and_is_case_insensitive() -> None:
    assert Selector.parse("model = ev6 AND region = eu And labels.x != y").terms == (
        Term("model", "=", ("ev6",)),
        Term("region", "=", ("eu",)),
        Term("labels.x", "!=", ("y",)),
    )


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_selector_matches_every_device(text: str) -> None:
    selector = Selector.parse(text)
    assert selector.terms == ()
    assert str(selector) == ""
    for dev in (device(), device(model="x", region="y", firmware="garbage", labels={"a": "b"})):
        assert selector.matches(dev)


@pytest.mark.parametrize(
    "text",
    [
        EXAMPLE,
        "model not in (ev6) and labels.ring != beta",
        "firmware < 4.10 and device_id = sim-000001",
        "region = eu",
    ],
)
def test_str_reparses_to_the_same_selector(text: str) -> None:
    selector = Selector.parse(text)
    assert Selector.parse(str(selector)) == selector


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dev", "expected"),
    [
        (device(), True),
        (device(model="ev9"), True),
        (device(model="ev3"), False),
        (device(region="us"), False),
        (device(region="EU"), False),  # text compares exactly
        (device(firmware="4.1.9"), False),
        (device(firmware="4.2.0"), True),
        (device(firmware="4.10"), True),
        (device(firmware="5"), True),
        (device(firmware="not-a-version"), False),
    ],
)
def test_match_design_example(dev: DeviceAttributes, expected: bool) -> None:
    assert Selector.parse(EXAMPLE).matches(dev) is expected


@pytest.mark.parametrize(
    ("text", "firmware", "expected"),
    [
        ("firmware > 4.9", "4.10", True),
        ("firmware >= 4.10", "4.9", False),
        ("firmware < 4.10", "4.9", True),
        ("firmware <= 4.9", "4.10", False),
        ("firmware = 4.2", "4.2.0", True),
        ("firmware = 4.2.0.0", "4.2", True),
        ("firmware != 4.2", "4.2.0", False),
        ("firmware > 4.2", "4.2.0", False),
        ("firmware >= 4.2", "4.2.0", True),
        ("firmware > 4.2", "4.2.1", True),
        ("firmware < 10", "9.99.99", True),
    ],
)
def test_firmware_compares_as_version(text: str, firmware: str, expected: bool) -> None:
    assert matches(text, device(firmware=firmware)) is expected


def test_firmware_does_not_compare_as_text() -> None:
    # As text "4.10" sorts before "4.9"; as a version it is newer.
    assert matches("firmware > 4.9", device(firmware="4.10"))
    assert not matches("firmware < 4.9", device(firmware="4.10"))


@pytest.mark.parametrize("op", [">=", ">", "<=", "<", "="])
def test_unparseable_device_firmware_never_satisfies_a_comparison(op: str) -> None:
    assert not matches(f"firmware {op} 4.2", device(firmware="4.2-beta"))


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("labels.ring = beta", {"ring": "beta"}, True),
        ("labels.ring = beta", {"ring": "stable"}, False),
        ("labels.ring = beta", {}, False),  # a missing label equals nothing
        ("labels.ring != beta", {"ring": "stable"}, True),
        ("labels.ring != beta", {"ring": "beta"}, False),
        ("labels.ring != beta", {}, True),  # ...and differs from everything
        ("labels.ring in (beta, canary)", {"ring": "canary"}, True),
        ("labels.ring in (beta, canary)", {}, False),
        ("labels.ring not in (beta, canary)", {"ring": "stable"}, True),
        ("labels.ring not in (beta, canary)", {"ring": "beta"}, False),
        ("labels.ring not in (beta, canary)", {}, True),
        ("labels.ring = beta and labels.site = berlin", {"ring": "beta", "site": "berlin"}, True),
        ("labels.ring = beta and labels.site = berlin", {"ring": "beta", "site": "paris"}, False),
        ("labels.model = ev6", {}, False),  # labels.model is a label, not the model
    ],
)
def test_labels(text: str, labels: dict[str, str], expected: bool) -> None:
    assert matches(text, device(labels=labels)) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model not in (ev9, ev3)", True),
        ("model not in (ev6, ev9)", False),
        ("model != ev9", True),
        ("model != ev6", False),
        ("region != 'eu'", False),
        ("device_id != sim-1", True),
        ("device_id = VIN-WVWZZZ1JZXW000001", True),
        ("model != ev9 and region not in (us, apac)", True),
        ("model != ev9 and region not in (eu, apac)", False),
    ],
)
def test_negations(text: str, expected: bool) -> None:
    assert matches(text, device()) is expected


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=4),
    st.lists(st.integers(0, 20), min_size=1, max_size=4),
    st.sampled_from([">=", ">", "<=", "<", "=", "!="]),
)
def test_firmware_comparison_agrees_with_version_order(
    wanted: list[int], actual: list[int], op: str
) -> None:
    wanted_text = ".".join(map(str, wanted))
    actual_text = ".".join(map(str, actual))
    left, right = Version.parse(actual_text), Version.parse(wanted_text)
    expected = {
        ">=": left >= right,
        ">": left > right,
        "<=": left <= right,
        "<": left < right,
        "=": left == right,
        "!=": left != right,
    }[op]
    assert matches(f"firmware {op} {wanted_text}", device(firmware=actual_text)) is expected


# ---------------------------------------------------------------------------
# Invalid selectors: always InvalidArgument on the selector field, naming the problem
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # unknown attribute
        ("colour = red", "unknown attribute 'colour'"),
        ("Model = ev6", "unknown attribute 'Model'"),
        ("labels = x", "unknown attribute 'labels'"),
        ("labels. = x", "unknown attribute 'labels.'"),
        ("model = ev6 and vin = x", "unknown attribute 'vin'"),
        # missing value
        ("model =", "expected a value"),
        ("model = ,", "expected a value"),
        ("model in ()", "expected a value"),
        ("model in (ev6,)", "expected a value"),
        ("model in (ev6, , ev9)", "expected a value"),
        ("firmware >=", "expected a value"),
        # missing operator / malformed lists
        ("model", "expected an operator"),
        ("model ev6", "expected an operator"),
        ("model == ev6", "expected a value"),
        ("model not (ev6)", "expected 'in' after 'not'"),
        ("model in ev6", "expected '('"),
        ("model in (ev6 ev9)", "expected ',' or ')'"),
        ("model in (ev6", "ends early"),
        # trailing garbage
        ("model = ev6 extra", "expected 'and', got 'extra'"),
        ("model = ev6 )", "expected 'and', got ')'"),
        ("model = ev6 or region = eu", "expected 'and', got 'or'"),
        ("model = ev6 and", "ends early"),
        ("model = ev6 and and", "unknown attribute 'and'"),
        ('region = "eu', "unexpected character"),
        ("region = eu; drop", "unexpected character"),
        # ordering on a non-firmware attribute
        ("region >= eu", ">= only applies to firmware"),
        ("model > ev6", "> only applies to firmware"),
        ("device_id <= x", "<= only applies to firmware"),
        ("labels.ring < beta", "< only applies to firmware"),
        # bad firmware version
        ("firmware >= 4.x", "'4.x' is not a dotted version"),
        ("firmware = v4.2", "'v4.2' is not a dotted version"),
        ("firmware < 4.", "'4.' is not a dotted version"),
        ("firmware > 1.2.3.4.5", "'1.2.3.4.5' is not a dotted version"),
        ("firmware != ''", "'' is not a dotted version"),
        ("model = ev6 and firmware >= 4..2", "'4..2' is not a dotted version"),
    ],
)
def test_invalid_selector(text: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        Selector.parse(text)
    assert exc.value.field == "selector"
    assert problem in exc.value.message
    assert str(exc.value) == f"selector: {exc.value.message}"


def test_unknown_attribute_message_lists_the_choices() -> None:
    with pytest.raises(InvalidArgument) as exc:
        Selector.parse("colour = red")
    for attr in ("model", "region", "firmware", "device_id", "labels.NAME"):
        assert attr in exc.value.message


@pytest.mark.parametrize("text", ["colour = red", "firmware >= 4.x", "model =", "region > eu"])
def test_invalid_selector_reports_callers_field(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        Selector.parse(text, field_name="rollout.eligibility")
    assert exc.value.field == "rollout.eligibility"


@given(st.text(max_size=60))
def test_parse_never_fails_with_anything_but_invalid_argument(text: str) -> None:
    try:
        selector = Selector.parse(text)
    except InvalidArgument as exc:
        assert exc.field == "selector"
    else:
        selector.matches(device())


SOUP = (
    "model region firmware labels.x and AND not in ( ) , = != >= > <= < 4.2 4.x ev6 'eu' \"\" \" '"
)
tokens_soup = st.lists(st.sampled_from(SOUP.split()), max_size=12).map(" ".join)


@given(st.one_of(tokens_soup, tokens_soup.map(lambda t: t.replace(" ", ""))))
def test_parse_grammar_soup(text: str) -> None:
    try:
        selector = Selector.parse(text)
    except InvalidArgument as exc:
        assert exc.field == "selector"
    else:
        selector.matches(device())


# ---------------------------------------------------------------------------
# Defects found and fixed; kept as regression tests.
# ---------------------------------------------------------------------------


def test_firmware_in_list_compares_as_version() -> None:
    assert matches("firmware in (4.2, 4.3)", device(firmware="4.2.0"))


@pytest.mark.parametrize("text", ["firmware in (banana)", "firmware not in (4.x)"])
def test_firmware_in_list_rejects_bad_version(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Selector.parse(text)


@pytest.mark.parametrize(
    "text", ['model in (ev6 ")"', "model in (ev6 ',' ev9)", 'model in "(" ev6)']
)
def test_quoted_punctuation_is_a_value_not_syntax(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Selector.parse(text)


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ('region = "eu"', 'region = "us"', False),
        ("model in (ev6, ev9)", "model in (niro)", False),
        ("model in (ev6, ev9)", "model = ev9", True),
        ('region = "eu"', "model = ev6", True),
        ("", 'region = "eu"', True),
        ("firmware >= 4.2", "firmware < 4.0", True),  # not proven disjoint: conservative
        ('model = ev6 and region = "eu"', 'model = ev6 and region = "us"', False),
    ],
)
def test_selectors_overlap_unless_they_pin_an_attribute_apart(
    a: str, b: str, overlap: bool
) -> None:
    assert Selector.parse(a).may_overlap(Selector.parse(b)) is overlap
    assert Selector.parse(b).may_overlap(Selector.parse(a)) is overlap
