"""Dotted versions: parsing, ordering (4.2 < 4.10) and trailing-zero equality."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ota.domain.version import Version
from ota.errors import InvalidArgument


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("0", (0,)),
        ("1", (1,)),
        ("1.2", (1, 2)),
        ("4.10", (4, 10)),
        ("1.2.3", (1, 2, 3)),
        ("1.2.3.4", (1, 2, 3, 4)),
        ("2024.11.25", (2024, 11, 25)),
        ("01.002", (1, 2)),
        ("1.2.0", (1, 2, 0)),
    ],
)
def test_parse(text: str, parts: tuple[int, ...]) -> None:
    assert Version.parse(text).parts == parts


@pytest.mark.parametrize("text", ["1", "1.2", "1.2.0", "4.10.3.7"])
def test_str_keeps_the_written_parts(text: str) -> None:
    assert str(Version.parse(text)) == text


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("4.2", "4.10"),
        ("4.9", "4.10"),
        ("1.2", "1.2.1"),
        ("1.2.0", "1.2.1"),
        ("1.99.99", "2"),
        ("0.9", "1.0"),
        ("1.0.0.9", "1.1"),
        ("9", "10"),
    ],
)
def test_ordering(lower: str, higher: str) -> None:
    low, high = Version.parse(lower), Version.parse(higher)
    assert low < high
    assert low <= high
    assert high > low
    assert high >= low
    assert low != high
    assert not high < low


def test_sorting() -> None:
    texts = ["4.10", "4.2", "10", "4.9.1", "4.9", "1.0.0.1", "4.2.0.1"]
    ordered = sorted(texts, key=Version.parse)
    assert ordered == ["1.0.0.1", "4.2", "4.2.0.1", "4.9", "4.9.1", "4.10", "10"]


@pytest.mark.parametrize(
    ("a", "b"),
    [("1.2", "1.2.0"), ("1.2", "1.2.0.0"), ("1", "1.0"), ("0", "0.0.0.0"), ("3.0.1", "3.0.1.0")],
)
def test_trailing_zeros_are_equal(a: str, b: str) -> None:
    va, vb = Version.parse(a), Version.parse(b)
    assert va == vb
    assert hash(va) == hash(vb)
    assert va <= vb and va >= vb
    assert not va < vb and not vb < va
    assert len({va, vb}) == 1


@pytest.mark.parametrize(("a", "b"), [("1.2", "1.2.1"), ("1.0.2", "1.2"), ("0.1", "1")])
def test_inner_zeros_matter(a: str, b: str) -> None:
    assert Version.parse(a) != Version.parse(b)


def test_not_equal_to_other_types() -> None:
    assert Version.parse("1.2") != "1.2"
    assert Version.parse("1") != 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "1.",
        ".1",
        "1..2",
        "a",
        "v1.2",
        "1.2a",
        "1.2-beta",
        "1.2.3.4.5",
        "-1",
        "+1",
        "1,2",
        " 1.2",
        "1.2 ",
        "1_000",
        "1.2.3.",
    ],
)
def test_invalid_raises(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        Version.parse(text)
    assert exc.value.field == "version"
    assert repr(text) in exc.value.message
    assert "not a dotted version" in exc.value.message


def test_invalid_reports_callers_field() -> None:
    with pytest.raises(InvalidArgument) as exc:
        Version.parse("x", field="feature.version")
    assert exc.value.field == "feature.version"


part_lists = st.lists(st.integers(0, 10**6), min_size=1, max_size=4)


def _strip(parts: list[int]) -> tuple[int, ...]:
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return tuple(parts)


@given(part_lists)
def test_round_trip(parts: list[int]) -> None:
    text = ".".join(map(str, parts))
    version = Version.parse(text)
    assert version.parts == tuple(parts)
    assert str(version) == text
    assert Version.parse(str(version)) == version


@given(part_lists, part_lists)
def test_order_is_numeric_tuple_order_ignoring_trailing_zeros(a: list[int], b: list[int]) -> None:
    va = Version.parse(".".join(map(str, a)))
    vb = Version.parse(".".join(map(str, b)))
    ka, kb = _strip(a), _strip(b)
    assert (va < vb) is (ka < kb)
    assert (va == vb) is (ka == kb)
    assert (va > vb) is (ka > kb)
    # exactly one of <, ==, > holds, and equal versions hash alike
    assert [va < vb, va == vb, va > vb].count(True) == 1
    if va == vb:
        assert hash(va) == hash(vb)


@given(part_lists, st.integers(1, 3))
def test_appending_zeros_keeps_equality(parts: list[int], zeros: int) -> None:
    padded = (parts + [0] * zeros)[:4]
    assert Version.parse(".".join(map(str, parts))) == Version.parse(".".join(map(str, padded)))


# Defects found and fixed; kept as regression tests.


def test_trailing_newline_is_invalid() -> None:
    with pytest.raises(InvalidArgument):
        Version.parse("1.2\n")


@pytest.mark.parametrize("text", ["\u0661.\u0662", "\uff11.\uff12"])  # Arabic-Indic, fullwidth
def test_non_ascii_digits_are_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Version.parse(text)
