"""Eligibility selectors over device attributes.

Grammar (a conjunction of terms; `and` binds them, nothing else is needed yet):

    selector := term ("and" term)*
    term     := attr op value | attr ["not"] "in" "(" value ("," value)* ")"
    attr     := "model" | "region" | "firmware" | "device_id" | "labels." NAME
    op       := "=" | "!=" | ">=" | ">" | "<=" | "<"

`firmware` compares as a dotted version (4.10 > 4.9); everything else as text.
An empty selector selects the whole fleet. Parsing validates, so an invalid
selector never reaches the engine.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ota.domain.version import Version
from ota.errors import InvalidArgument

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"[^"]*"|'[^']*')
      | (?P<op>>=|<=|!=|=|>|<|\(|\)|,)
      | (?P<word>[A-Za-z0-9_.\-:/+]+)
    )""",
    re.VERBOSE,
)
_ATTRS = ("model", "region", "firmware", "device_id")


@dataclass(frozen=True)
class DeviceAttributes:
    device_id: str
    model: str
    region: str
    firmware: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def get(self, attr: str) -> str | None:
        if attr.startswith("labels."):
            return self.labels.get(attr.removeprefix("labels."))
        value: str = getattr(self, attr)
        return value


@dataclass(frozen=True)
class Term:
    attr: str
    op: str
    values: tuple[str, ...]

    def matches(self, device: DeviceAttributes) -> bool:
        actual = device.get(self.attr)
        if actual is None:
            return self.op in ("!=", "not in")
        if self.op in ("in", "not in"):
            if self.attr == "firmware":
                try:
                    found = Version.parse(actual) in {Version.parse(v) for v in self.values}
                except InvalidArgument:
                    found = False
            else:
                found = actual in self.values
            return found if self.op == "in" else not found
        if self.attr == "firmware":
            try:
                left: object = Version.parse(actual)
            except InvalidArgument:
                return False
            right: object = Version.parse(self.values[0])
        else:
            left, right = actual, self.values[0]
        return _COMPARE[self.op](left, right)

    def __str__(self) -> str:
        if self.op in ("in", "not in"):
            return f"{self.attr} {self.op} ({', '.join(self.values)})"
        return f'{self.attr} {self.op} "{self.values[0]}"'


_COMPARE: dict[str, Callable[[object, object], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,  # type: ignore[operator]
    ">": lambda a, b: a > b,  # type: ignore[operator]
    "<=": lambda a, b: a <= b,  # type: ignore[operator]
    "<": lambda a, b: a < b,  # type: ignore[operator]
}


@dataclass(frozen=True)
class Selector:
    terms: tuple[Term, ...]

    @classmethod
    def parse(cls, text: str, *, field_name: str = "selector") -> Selector:
        return _Parser(text, field_name).parse()

    def matches(self, device: DeviceAttributes) -> bool:
        return all(term.matches(device) for term in self.terms)

    def may_overlap(self, other: Selector) -> bool:
        """False only when no device can match both (they pin an attribute apart).

        Conservative: anything it cannot prove disjoint counts as overlapping.
        """
        mine, theirs = self._pinned(), other._pinned()
        return all(
            not (mine[attr] and theirs[attr]) or bool(mine[attr] & theirs[attr])
            for attr in mine.keys() & theirs.keys()
        )

    def _pinned(self) -> dict[str, set[str]]:
        """Attributes an `=` or `in` term restricts to a set of values (firmware excepted)."""
        pinned: dict[str, set[str]] = {}
        for term in self.terms:
            if term.op in ("=", "in") and term.attr != "firmware":
                values = set(term.values)
                pinned[term.attr] = pinned[term.attr] & values if term.attr in pinned else values
        return pinned

    def __str__(self) -> str:
        return " and ".join(str(t) for t in self.terms)


class _Parser:
    def __init__(self, text: str, field_name: str) -> None:
        self.field = field_name
        self.tokens = self._tokenize(text)
        self.pos = 0

    def _tokenize(self, text: str) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        pos = 0
        text = text.strip()
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            if not match or match.end() == pos:
                raise InvalidArgument(
                    f"unexpected character at {pos}: {text[pos:]!r}", field=self.field
                )
            kind = match.lastgroup or ""
            value = match.group(kind)
            tokens.append((kind, value[1:-1] if kind == "str" else value))
            pos = match.end()
        return tokens

    def _next(self, expected: str) -> tuple[str, str]:
        if self.pos >= len(self.tokens):
            raise InvalidArgument(f"selector ends early; expected {expected}", field=self.field)
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def parse(self) -> Selector:
        if not self.tokens:
            return Selector(())
        terms = [self._term()]
        while self.pos < len(self.tokens):
            kind, value = self._next("'and'")
            if kind != "word" or value.lower() != "and":
                raise InvalidArgument(f"expected 'and', got {value!r}", field=self.field)
            terms.append(self._term())
        return Selector(tuple(terms))

    def _term(self) -> Term:
        _, attr = self._next("an attribute")
        if attr not in _ATTRS and not (attr.startswith("labels.") and len(attr) > 7):
            raise InvalidArgument(
                f"unknown attribute {attr!r}; use one of {', '.join(_ATTRS)} or labels.NAME",
                field=self.field,
            )
        kind, op = self._next("an operator")
        if kind == "word" and op.lower() == "not":
            _, word = self._next("'in'")
            if word.lower() != "in":
                raise InvalidArgument(f"expected 'in' after 'not', got {word!r}", field=self.field)
            return self._checked(Term(attr, "not in", self._list()))
        if kind == "word" and op.lower() == "in":
            return self._checked(Term(attr, "in", self._list()))
        if kind != "op" or op not in _COMPARE:
            raise InvalidArgument(
                f"expected an operator after {attr}, got {op!r}", field=self.field
            )
        vkind, value = self._next("a value")
        if vkind not in ("word", "str"):
            raise InvalidArgument(
                f"expected a value after {attr} {op}, got {value!r}", field=self.field
            )
        if attr == "firmware" or op in (">=", ">", "<=", "<"):
            if attr != "firmware":
                raise InvalidArgument(f"{op} only applies to firmware", field=self.field)
            Version.parse(value, field=self.field)
        return Term(attr, op, (value,))

    def _checked(self, term: Term) -> Term:
        if term.attr == "firmware":
            for value in term.values:
                Version.parse(value, field=self.field)
        return term

    def _list(self) -> tuple[str, ...]:
        kind, value = self._next("'('")
        if kind != "op" or value != "(":
            raise InvalidArgument(f"expected '(' after 'in', got {value!r}", field=self.field)
        values: list[str] = []
        while True:
            kind, value = self._next("a value")
            if kind not in ("word", "str"):
                raise InvalidArgument(
                    f"expected a value in the list, got {value!r}", field=self.field
                )
            values.append(value)
            sep_kind, sep = self._next("',' or ')'")
            if sep_kind == "op" and sep == ")":
                return tuple(values)
            if sep_kind != "op" or sep != ",":
                raise InvalidArgument(f"expected ',' or ')', got {sep!r}", field=self.field)
