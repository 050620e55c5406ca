"""Who the simulated devices are and how they misbehave (failed installs, wrong clocks)."""

from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ota.clock import Clock
from ota.errors import InvalidArgument


@dataclass(frozen=True)
class DeviceProfile:
    device_id: str
    model: str
    region: str
    firmware: str
    # Registered as the device's labels: (key, value) pairs, a tuple so the profile hashes.
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FailureProfile:
    """Install failure probability by (model, feature version); `*` matches any version."""

    rates: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: list[str]) -> FailureProfile:
        """Each spec is MODEL[@VERSION]=PROBABILITY, e.g. `ev9@2.0.0=1.0`."""
        rates: dict[tuple[str, str], float] = {}
        for spec in specs:
            try:
                target, prob = spec.split("=", 1)
                model, _, version = target.partition("@")
                p = float(prob)
            except ValueError as exc:
                raise InvalidArgument(
                    f"{spec!r} is not MODEL[@VERSION]=PROBABILITY", field="fail"
                ) from exc
            if not 0.0 <= p <= 1.0:
                raise InvalidArgument(f"probability in {spec!r} must be in [0, 1]", field="fail")
            rates[(model, version or "*")] = p
        return cls(rates)

    def install_fails(self, model: str, version: str, rng: random.Random) -> bool:
        p = self.rates.get((model, version), self.rates.get((model, "*"), 0.0))
        return rng.random() < p


@dataclass(frozen=True)
class HealthProfile:
    """Crash probability per health sample, by (model, feature version).

    `*` matches any model or any version; a device that does not run the
    feature samples as version `*` only. The most specific rule wins:
    (model, version), then (model, `*`), then (`*`, version), then (`*`, `*`).
    Each sample that crashes reports one crash and one feature error.
    """

    rates: dict[tuple[str, str], float] = field(default_factory=dict)
    # Share of health samples in which the feature was used, by (model, version), with
    # the same precedence; a used sample reports 1 to 5 uses.
    use_rates: dict[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: list[str], uses: list[str] | None = None) -> HealthProfile:
        """Each spec is MODEL[@VERSION]=PROBABILITY, e.g. `*@2.0.0=1.0` or `ev9=0.2`."""
        rates: dict[tuple[str, str], float] = {}
        for spec in specs:
            try:
                target, prob = spec.split("=", 1)
                model, _, version = target.partition("@")
                p = float(prob)
                if not model:
                    raise ValueError(spec)
            except ValueError as exc:
                raise InvalidArgument(
                    f"{spec!r} is not MODEL[@VERSION]=PROBABILITY", field="crash"
                ) from exc
            if not 0.0 <= p <= 1.0:
                raise InvalidArgument(f"probability in {spec!r} must be in [0, 1]", field="crash")
            rates[(model, version or "*")] = p
        use_rates = cls.parse(uses).rates if uses else {}
        return cls(rates, use_rates)

    @classmethod
    def per_model(cls, rates: dict[str, float]) -> HealthProfile:
        """The same probability for every version of each model (`{"ev9": 1.0}`)."""
        return cls({(model, "*"): p for model, p in rates.items()})

    def crash_rate(self, model: str, version: str) -> float:
        return _most_specific(self.rates, model, version)

    def use_rate(self, model: str, version: str) -> float:
        return _most_specific(self.use_rates, model, version)

    def merged(self, other: HealthProfile) -> HealthProfile:
        """These rules, with `other`'s taking precedence where both set one."""
        return HealthProfile(self.rates | other.rates, self.use_rates | other.use_rates)


def _most_specific(rates: dict[tuple[str, str], float], model: str, version: str) -> float:
    for key in ((model, version), (model, "*"), ("*", version), ("*", "*")):
        if key in rates:
            return rates[key]
    return 0.0


def compose_fleet(
    count: int, *, models: list[str], regions: list[str], firmware: str, prefix: str = "sim"
) -> list[DeviceProfile]:
    """A deterministic fleet: models and regions assigned round-robin."""
    return [
        DeviceProfile(
            device_id=f"{prefix}-{i:06d}",
            model=models[i % len(models)],
            region=regions[(i // len(models)) % len(regions)],
            firmware=firmware,
        )
        for i in range(count)
    ]


class SkewedClock:
    """A device clock running `offset` ahead of (or, negative, behind) the true time."""

    def __init__(self, base: Clock, offset: timedelta) -> None:
        self._base = base
        self.offset = offset

    def now(self) -> datetime:
        return self._base.now() + self.offset


@dataclass(frozen=True)
class ClockSkew:
    """How far each device's clock is off, by device id pattern (fnmatch); first match wins.

    Callable as ``skew(device_id) -> timedelta``, the form `FleetSettings` takes.
    """

    rules: tuple[tuple[str, timedelta], ...] = ()

    @classmethod
    def parse(cls, specs: list[str]) -> ClockSkew:
        """Each spec is PATTERN=SECONDS, e.g. `sim-00000[0-4]=-7200` (two hours behind)."""
        rules: list[tuple[str, timedelta]] = []
        for spec in specs:
            pattern, sep, seconds = spec.rpartition("=")
            try:
                if not sep or not pattern:
                    raise ValueError(spec)
                offset = timedelta(seconds=float(seconds))
            except (ValueError, OverflowError) as exc:
                raise InvalidArgument(
                    f"{spec!r} is not DEVICE_PATTERN=SECONDS", field="clock_skew"
                ) from exc
            rules.append((pattern, offset))
        return cls(tuple(rules))

    def __call__(self, device_id: str) -> timedelta:
        for pattern, offset in self.rules:
            if fnmatch.fnmatchcase(device_id, pattern):
                return offset
        return timedelta(0)
