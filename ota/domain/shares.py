"""Shares of a fleet as a person writes them: always with their unit.

A share is stored in parts per million (1 % = 10 000 ppm). Wherever a person
writes one — a stage's exposure, the holdout, a gate's `max`, `--stages`,
`--max-failure` — it carries its unit:

    50%   0.5%          a percentage (at most 4 decimals: 1 ppm is 0.0001 %)
    500000ppm           parts per million, as text
    {ppm: 500000}       parts per million, as a mapping (plan files)

A bare number (`50`) is refused, never guessed: it meant ppm once, and
`exposure: 50` exposed nobody.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from ota.domain.bucketing import PPM_MAX
from ota.errors import InvalidArgument

PPM_PER_PERCENT = 10_000
_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")


def share_text(ppm: int) -> str:
    """`10%`, `0.004%`: how ota shows a share."""
    text = f"{Decimal(ppm) / PPM_PER_PERCENT:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text + "%"


def _forms(example_ppm: int, *, mapping: bool) -> str:
    pct = share_text(example_ppm)
    ppm = f"{{ppm: {example_ppm}}} or {example_ppm}ppm" if mapping else f"{example_ppm}ppm"
    return f"write a percentage like {pct}, or parts per million like {ppm}"


def parse_share(value: Any, field: str, *, mapping: bool = True) -> int:
    """A share from a plan document (`mapping=True`) or a flag; refuses a bare number."""
    if mapping and isinstance(value, Mapping):
        unknown = sorted(str(k) for k in value if k != "ppm")
        if unknown:
            raise InvalidArgument("unknown field (known: ppm)", field=f"{field}.{unknown[0]}")
        ppm = value.get("ppm")
        if isinstance(ppm, bool) or not isinstance(ppm, int):
            raise InvalidArgument(
                f"must be a whole number of parts per million, got {ppm!r}", field=f"{field}.ppm"
            )
        return _in_range(ppm, repr(ppm), f"{field}.ppm")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidArgument(
            f"{value!r} is not a share: {_forms(100_000, mapping=mapping)}", field=field
        )
    text = str(value).strip()
    if isinstance(value, int | float) or _NUMBER.match(text):
        # A bare number: say what it would be as a percentage, the usual intent.
        example = _bare_example(text)
        raise InvalidArgument(
            f"{text} has no unit: {_forms(example, mapping=mapping)}{_fraction_hint(text)}",
            field=field,
        )
    lowered = text.lower()
    if lowered.endswith("%"):
        return _in_range(_percent(lowered[:-1].strip(), text, field), text, field)
    if lowered.endswith("ppm"):
        digits = lowered[:-3].strip()
        if not digits.isdigit() or not digits.isascii():
            raise InvalidArgument(
                f"{text!r} is not a whole number of parts per million (0ppm to 1000000ppm)",
                field=field,
            )
        # More digits than 1000000 has is out of range, said without converting them.
        return _in_range(int(digits) if len(digits) <= 7 else PPM_MAX + 1, text, field)
    raise InvalidArgument(
        f"{text!r} is not a share: {_forms(100_000, mapping=mapping)}", field=field
    )


def _bare_example(text: str) -> int:
    """The share a bare number most likely meant, to show it written with its unit."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return 100_000
    as_percent = number * PPM_PER_PERCENT
    if 0 < number <= 100 and as_percent == as_percent.to_integral_value():
        return int(as_percent)
    if 0 < number <= PPM_MAX and number == number.to_integral_value():
        return int(number)
    return 100_000


def _fraction_hint(text: str) -> str:
    """For 0.05, which may be a fraction: what it is as a percentage, so 0.05% is not a slip."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return ""
    ppm = number * PPM_MAX
    if not 0 < number < 1 or ppm != ppm.to_integral_value():
        return ""
    return f" (as a fraction, {text} is {share_text(int(ppm))})"


def _percent(number: str, text: str, field: str) -> int:
    if not _NUMBER.match(number):
        raise InvalidArgument(f"{text!r} is not a percentage (e.g. 10% or 0.5%)", field=field)
    ppm = Decimal(number) * PPM_PER_PERCENT
    if ppm != ppm.to_integral_value():
        raise InvalidArgument(
            f"{text} is finer than 1 ppm (0.0001%): give at most 4 decimals", field=field
        )
    return int(ppm)


def _in_range(ppm: int, text: str, field: str) -> int:
    if not 0 <= ppm <= PPM_MAX:
        raise InvalidArgument(
            f"must be between 0% and 100% (0 to {PPM_MAX} ppm), got {text}", field=field
        )
    return ppm
