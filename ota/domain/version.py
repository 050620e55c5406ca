"""Dotted versions of features and firmware (4.2 < 4.10)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from ota.errors import InvalidArgument

_VERSION = re.compile(r"[0-9]+(\.[0-9]+){0,3}")


@total_ordering
@dataclass(frozen=True)
class Version:
    parts: tuple[int, ...]

    @classmethod
    def parse(cls, text: str, *, field: str = "version") -> Version:
        if not _VERSION.fullmatch(text):
            raise InvalidArgument(
                f"{text!r} is not a dotted version such as 1.4 or 2.0.3", field=field
            )
        return cls(tuple(int(p) for p in text.split(".")))

    def _key(self) -> tuple[int, ...]:
        # 1.2 == 1.2.0: trailing zeros do not make a version newer.
        parts = list(self.parts)
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __str__(self) -> str:
        return ".".join(str(p) for p in self.parts)
