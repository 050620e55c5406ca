"""Which devices a bundle was built for: the one definition of compatibility.

A release engineer signs a bundle for some device models (none named: every
model) and, optionally, a firmware floor. A device is compatible when its model
is one of them and its firmware is at least the floor; firmware that does not
parse as a version is below every floor. Exposure, the holdout's health
attribution and the fleet's eligibility queries all judge through
`Compatibility`; SQL builds its conditions from `models` and `admits_firmware`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ota.domain.version import Version
from ota.errors import InvalidArgument


@dataclass(frozen=True)
class Compatibility:
    """What one bundle was signed for: `models` (empty: every model) and `min_firmware` ('' none)."""

    models: frozenset[str] = frozenset()
    min_firmware: str = ""

    @classmethod
    def of(cls, models: Iterable[str], min_firmware: str | None) -> Compatibility:
        return cls(frozenset(models), min_firmware or "")

    def admits_model(self, model: str) -> bool:
        return not self.models or model in self.models

    def admits_firmware(self, firmware: str) -> bool:
        if not self.min_firmware:
            return True
        try:
            return Version.parse(firmware) >= Version.parse(self.min_firmware)
        except InvalidArgument:
            return False

    def admits(self, model: str, firmware: str) -> bool:
        """Whether a device of this model running this firmware may install the bundle."""
        return self.admits_model(model) and self.admits_firmware(firmware)
