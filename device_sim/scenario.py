"""Scenario files: a fleet and how it behaves, in YAML, for `ota-sim run --scenario FILE`.

A scenario says who the devices are (`fleet`, with optional `labels`), how likely installs fail and
health samples crash for some of them (`failures`), how often they use the
feature (`usage`: the share of health samples reporting a use), whose clocks are off
(`clock_skew`), how long devices wait out an unreachable control plane before
saying so (`unreachable_for`, seconds), who is slow to act on a desired state (`latency`), who goes
offline and comes back (`churn`), and which devices misbehave on the wire
(`misbehaving`). Rules pick devices with `model`, `region`, `firmware` and
`devices` (device id) patterns, fnmatch-style; a rule without any picks all.
Every mistake in the file is an `InvalidArgument` naming the field, e.g.
``churn[0].fraction``. Every number is bounded (see `Bounds` below and the
README), and the file itself is bounded in size and nesting before it is parsed.

    seed: 7
    prefix: sim
    fleet:
      - {count: 60, model: ev6, region: eu, firmware: 4.2.0}
      - {count: 40, model: ev9, region: us, firmware: 4.1.0, labels: {ring: beta}}
    failures:
      - {model: ev9, region: us, version: 2.0.0, install: 0.5, crash: 0.1}
    health_interval: 30
    unreachable_for: 600
    usage:
      - {model: ev6, version: 1.0.0, rate: 0.8}
    clock_skew:
      - {devices: "sim-00000[0-4]", seconds: -7200}
    latency:
      - {region: us, seconds: 0.2}
    churn:
      - {region: eu, fraction: 0.2, after: 5, offline: 10, every: 60}
    misbehaving:
      - {kind: garbage, count: 2, messages: 5}
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from device_sim.profile import DeviceProfile, FailureProfile, HealthProfile
from ota.domain.documents import DocumentLimits, load_document
from ota.errors import InvalidArgument

SCENARIO_LIMITS = DocumentLimits(max_bytes=1024 * 1024, max_depth=16, max_nodes=200_000)
# Bounds of a scenario's numbers: what the simulator can run, and what the control
# plane stores (device ids, models, regions and firmware fit their columns).
MAX_FLEET = 1_000_000  # devices in all (device ids are PREFIX-NNNNNN)
MAX_SEED = 2**63 - 1
MAX_SECONDS = 365 * 86_400  # after, offline, every, clock skew (either way)
MAX_HEALTH_INTERVAL = 86_400.0
MAX_LATENCY = 3_600.0
MAX_UNREACHABLE_FOR = 7 * 86_400.0  # how long a device may wait out the control plane
MAX_MESSAGES = 1_000_000
MAX_RULES = 1_000  # entries in each list
MAX_LABELS = 16  # labels of each fleet group
# Column widths of the device table; the prefix leaves room for "-NNNNNN".
WIDTHS = {"model": 64, "region": 64, "firmware": 32, "prefix": 64, "version": 32}

# What a misbehaving device sends, besides doing its honest work:
MISBEHAVIOURS = {
    "garbage": "random bytes on its own events topic (dropped as malformed)",
    "oversized": "an event larger than the control plane accepts (dropped as oversized)",
    "flood": "well-formed events for a rollout that does not exist, as fast as it can "
    "(dropped as unknown_rollout)",
    "impersonate": "events naming another device, on its own topic (dropped as device_mismatch)",
    "foreign_topic": "events on another device's topic (refused by the broker's ACL)",
    "replay": "its own earlier events again, same sequence numbers (ignored as duplicates)",
}

_SELECTOR_KEYS = ("model", "region", "firmware", "devices")
_TOP_KEYS = {
    "usage",
    "seed",
    "prefix",
    "fleet",
    "failures",
    "health_interval",
    "clock_skew",
    "latency",
    "churn",
    "misbehaving",
    "unreachable_for",
}


@dataclass(frozen=True)
class Selector:
    """Which devices a rule applies to: fnmatch patterns, all of which must match."""

    model: str = "*"
    region: str = "*"
    firmware: str = "*"
    devices: str = "*"

    def matches(self, p: DeviceProfile) -> bool:
        return (
            fnmatch.fnmatchcase(p.model, self.model)
            and fnmatch.fnmatchcase(p.region, self.region)
            and fnmatch.fnmatchcase(p.firmware, self.firmware)
            and fnmatch.fnmatchcase(p.device_id, self.devices)
        )


@dataclass(frozen=True)
class FleetGroup:
    count: int
    model: str
    region: str
    firmware: str
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FailureRule:
    select: Selector
    version: str  # feature version, or "*"
    install: float | None  # install failure probability
    crash: float | None  # probability that a health sample reports a crash


@dataclass(frozen=True)
class UsageRule:
    select: Selector
    version: str  # feature version, or "*"
    rate: float  # share of health samples in which the feature was used


@dataclass(frozen=True)
class SkewRule:
    select: Selector
    offset: timedelta


@dataclass(frozen=True)
class LatencyRule:
    select: Selector
    seconds: float


@dataclass(frozen=True)
class ChurnRule:
    """`fraction` of the selected devices leave `after` seconds, come back `offline` later;
    again every `every` seconds (0: once)."""

    select: Selector
    fraction: float
    after: float
    offline: float
    every: float


@dataclass(frozen=True)
class Misbehaviour:
    """`count` devices (of those selected, the first by id) each send `messages` bad messages,
    `after` seconds after they first connect."""

    kind: str
    select: Selector
    count: int
    messages: int
    after: float


@dataclass(frozen=True)
class Scenario:
    fleet: tuple[FleetGroup, ...]
    seed: int = 1
    prefix: str = "sim"
    failures: tuple[FailureRule, ...] = ()
    health_interval: float = 0.0
    clock_skew: tuple[SkewRule, ...] = ()
    latency: tuple[LatencyRule, ...] = ()
    churn: tuple[ChurnRule, ...] = ()
    misbehaving: tuple[Misbehaviour, ...] = ()
    # Seconds a device waits out an unreachable control plane before it says so
    # (None: the simulator's default, `--unreachable-for`).
    unreachable_for: float | None = None
    usage: tuple[UsageRule, ...] = ()
    _devices: list[DeviceProfile] = field(default_factory=list, compare=False, repr=False)

    @property
    def size(self) -> int:
        return sum(g.count for g in self.fleet)

    def devices(self) -> list[DeviceProfile]:
        """The fleet, device ids PREFIX-000000 up, in the order the groups are listed."""
        if not self._devices:
            i = 0
            for g in self.fleet:
                for _ in range(g.count):
                    self._devices.append(
                        DeviceProfile(
                            f"{self.prefix}-{i:06d}", g.model, g.region, g.firmware, g.labels
                        )
                    )
                    i += 1
        return list(self._devices)

    def failures_for(self, p: DeviceProfile) -> FailureProfile:
        """Install failure probabilities of one device, by feature version (first rule wins)."""
        rates: dict[tuple[str, str], float] = {}
        for rule in self.failures:
            if rule.install is not None and rule.select.matches(p):
                rates.setdefault((p.model, rule.version), rule.install)
        return FailureProfile(rates)

    def health_for(self, p: DeviceProfile) -> HealthProfile:
        """Crash probabilities of one device's health samples, by version (first rule wins)."""
        rates: dict[tuple[str, str], float] = {}
        for rule in self.failures:
            if rule.crash is not None and rule.select.matches(p):
                rates.setdefault((p.model, rule.version), rule.crash)
        uses: dict[tuple[str, str], float] = {}
        for usage in self.usage:
            if usage.select.matches(p):
                uses.setdefault((p.model, usage.version), usage.rate)
        return HealthProfile(rates, uses)

    def skew_for(self, device_id: str, profiles: Mapping[str, DeviceProfile]) -> timedelta:
        p = profiles.get(device_id)
        for rule in self.clock_skew:
            if p is not None and rule.select.matches(p):
                return rule.offset
        return timedelta(0)

    def clock_skew_fn(self) -> Callable[[str], timedelta] | None:
        if not self.clock_skew:
            return None
        profiles = {p.device_id: p for p in self.devices()}
        return lambda device_id: self.skew_for(device_id, profiles)

    def latency_for(self, p: DeviceProfile) -> float:
        for rule in self.latency:
            if rule.select.matches(p):
                return rule.seconds
        return 0.0

    def churning(self, rule: ChurnRule, profiles: list[DeviceProfile]) -> list[str]:
        """The devices `rule` takes offline: every k-th selected one, for its fraction."""
        chosen = [p.device_id for p in profiles if rule.select.matches(p)]
        if rule.fraction <= 0 or not chosen:
            return []
        step = 1 / rule.fraction
        picks = sorted(
            {math.floor(k * step) for k in range(math.floor(len(chosen) * rule.fraction))}
        )
        return [chosen[i] for i in picks if i < len(chosen)]

    def misbehaving_devices(self, m: Misbehaviour, profiles: list[DeviceProfile]) -> list[str]:
        return [p.device_id for p in profiles if m.select.matches(p)][: m.count]


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file; every mistake names its field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {path}: {exc.strerror}", field="scenario") from exc
    data = load_document(text, field="scenario", what=str(path), limits=SCENARIO_LIMITS)
    return parse_scenario(data)


def parse_scenario(data: Any) -> Scenario:
    """A `Scenario` from the parsed YAML document."""
    doc = _mapping(data, "scenario", _TOP_KEYS)
    if "fleet" not in doc:
        raise InvalidArgument(
            "is required: a list of {count, model, region, firmware}", field="fleet"
        )
    fleet = tuple(_group(g, f"fleet[{i}]") for i, g in enumerate(_list(doc["fleet"], "fleet")))
    if not fleet:
        raise InvalidArgument("must list at least one group of devices", field="fleet")
    total = sum(g.count for g in fleet)
    if total > MAX_FLEET:
        raise InvalidArgument(
            f"may hold at most {MAX_FLEET} devices in all, got {total}", field="fleet"
        )
    prefix = _str(doc.get("prefix", "sim"), "prefix")
    unreachable_for = None
    if "unreachable_for" in doc:
        unreachable_for = _number(
            doc["unreachable_for"], "unreachable_for", low=0, high=MAX_UNREACHABLE_FOR
        )
    return Scenario(
        unreachable_for=unreachable_for,
        fleet=fleet,
        seed=_int(doc.get("seed", 1), "seed", low=0, high=MAX_SEED),
        prefix=prefix,
        failures=tuple(
            _failure(r, f"failures[{i}]")
            for i, r in enumerate(_list(doc.get("failures"), "failures"))
        ),
        health_interval=_number(
            doc.get("health_interval", 0), "health_interval", low=0, high=MAX_HEALTH_INTERVAL
        ),
        clock_skew=tuple(
            SkewRule(
                _selector(r, f"clock_skew[{i}]"),
                timedelta(
                    seconds=_number(
                        _need(r, "seconds", f"clock_skew[{i}]"),
                        f"clock_skew[{i}].seconds",
                        low=-MAX_SECONDS,
                        high=MAX_SECONDS,
                    )
                ),
            )
            for i, r in enumerate(_rules(doc.get("clock_skew"), "clock_skew", {"seconds"}))
        ),
        latency=tuple(
            LatencyRule(
                _selector(r, f"latency[{i}]"),
                _number(
                    _need(r, "seconds", f"latency[{i}]"),
                    f"latency[{i}].seconds",
                    low=0,
                    high=MAX_LATENCY,
                ),
            )
            for i, r in enumerate(_rules(doc.get("latency"), "latency", {"seconds"}))
        ),
        churn=tuple(
            _churn(r, f"churn[{i}]")
            for i, r in enumerate(
                _rules(doc.get("churn"), "churn", {"fraction", "after", "offline", "every"})
            )
        ),
        usage=tuple(
            UsageRule(
                _selector(r, f"usage[{i}]"),
                _str(r.get("version", "*"), f"usage[{i}].version"),
                _probability(_need(r, "rate", f"usage[{i}]"), f"usage[{i}].rate"),
            )
            for i, r in enumerate(_rules(doc.get("usage"), "usage", {"version", "rate"}))
        ),
        misbehaving=tuple(
            _misbehaviour(r, f"misbehaving[{i}]")
            for i, r in enumerate(
                _rules(
                    doc.get("misbehaving"), "misbehaving", {"kind", "count", "messages", "after"}
                )
            )
        ),
    )


# --- fields -------------------------------------------------------------------------------


def _group(raw: Any, where: str) -> FleetGroup:
    r = _mapping(raw, where, {"count", "model", "region", "firmware", "labels"})
    count = _int(_need(r, "count", where), f"{where}.count", low=1, high=MAX_FLEET)
    return FleetGroup(
        count=count,
        model=_str(_need(r, "model", where), f"{where}.model"),
        region=_str(_need(r, "region", where), f"{where}.region"),
        firmware=_str(r.get("firmware", "4.2.0"), f"{where}.firmware"),
        labels=_labels(r.get("labels", {}), f"{where}.labels"),
    )


def _labels(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"must be a mapping of label to value, got {_kind(raw)}", field=where)
    if len(raw) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels, got {len(raw)}", field=where)
    return tuple((_str(k, f"{where}.{k}"), _str(v, f"{where}.{k}")) for k, v in sorted(raw.items()))


def _failure(raw: Any, where: str) -> FailureRule:
    r = _mapping(raw, where, {*_SELECTOR_KEYS, "version", "install", "crash"})
    install = r.get("install")
    crash = r.get("crash")
    if install is None and crash is None:
        raise InvalidArgument("needs install or crash (a probability)", field=where)
    return FailureRule(
        select=_selector(r, where),
        version=_str(r.get("version", "*"), f"{where}.version"),
        install=None if install is None else _probability(install, f"{where}.install"),
        crash=None if crash is None else _probability(crash, f"{where}.crash"),
    )


def _churn(r: dict[str, Any], where: str) -> ChurnRule:
    return ChurnRule(
        select=_selector(r, where),
        fraction=_probability(_need(r, "fraction", where), f"{where}.fraction"),
        after=_seconds(r.get("after", 0), f"{where}.after"),
        offline=_seconds(_need(r, "offline", where), f"{where}.offline"),
        every=_seconds(r.get("every", 0), f"{where}.every"),
    )


def _misbehaviour(r: dict[str, Any], where: str) -> Misbehaviour:
    kind = _str(_need(r, "kind", where), f"{where}.kind")
    if kind not in MISBEHAVIOURS:
        raise InvalidArgument(
            f"{kind!r} is not one of {', '.join(sorted(MISBEHAVIOURS))}", field=f"{where}.kind"
        )
    return Misbehaviour(
        kind=kind,
        select=_selector(r, where),
        count=_int(r.get("count", 1), f"{where}.count", low=1, high=MAX_FLEET),
        messages=_int(r.get("messages", 1), f"{where}.messages", low=1, high=MAX_MESSAGES),
        after=_seconds(r.get("after", 0), f"{where}.after"),
    )


def _rules(raw: Any, where: str, keys: set[str]) -> list[dict[str, Any]]:
    return [
        _mapping(r, f"{where}[{i}]", {*_SELECTOR_KEYS, *keys})
        for i, r in enumerate(_list(raw, where))
    ]


def _selector(r: dict[str, Any], where: str) -> Selector:
    return Selector(**{k: _str(r[k], f"{where}.{k}") for k in _SELECTOR_KEYS if k in r})


def _mapping(raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidArgument(f"must be a mapping, got {_kind(raw)}", field=where)
    for key in raw:
        if key not in allowed:
            raise InvalidArgument(
                f"unknown field {key!r} (expected one of {', '.join(sorted(allowed))})",
                field=f"{where}.{key}" if where != "scenario" else str(key),
            )
    return raw


def _list(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidArgument(f"must be a list, got {_kind(raw)}", field=where)
    if len(raw) > MAX_RULES:
        raise InvalidArgument(f"may list at most {MAX_RULES}, got {len(raw)}", field=where)
    return raw


def _need(r: dict[str, Any], key: str, where: str) -> Any:
    if key not in r or r[key] is None:
        raise InvalidArgument("is required", field=f"{where}.{key}")
    return r[key]


def _str(raw: Any, where: str) -> str:
    # YAML reads 4.2 as a number; a firmware or version written so is still meant as text.
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise InvalidArgument(f"must be text, got {_kind(raw)}", field=where)
    text = str(raw)
    if not text or any(c.isspace() for c in text):
        raise InvalidArgument(f"{text!r} must be one non-empty word", field=where)
    width = WIDTHS.get(where.rpartition(".")[2], 128)
    if len(text) > width:
        raise InvalidArgument(f"must be at most {width} characters, got {len(text)}", field=where)
    return text


def _int(raw: Any, where: str, *, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise InvalidArgument(f"must be a whole number, got {_kind(raw)}", field=where)
    if not low <= raw <= high:
        raise InvalidArgument(f"must be between {low} and {high}, got {raw}", field=where)
    return raw


def _number(raw: Any, where: str, *, low: float, high: float) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidArgument(f"must be a number, got {_kind(raw)}", field=where)
    # Compared before converting (a 400-digit integer is no float); NaN compares false.
    if not low <= raw <= high:
        raise InvalidArgument(
            f"must be between {low:g} and {high:g}, got {_short(raw)}", field=where
        )
    return float(raw)


def _seconds(raw: Any, where: str) -> float:
    return _number(raw, where, low=0, high=MAX_SECONDS)


def _short(raw: float) -> str:
    try:
        text = str(float(raw))
    except OverflowError:  # an integer beyond any float
        text = str(raw)
    return text if len(text) <= 24 else f"{text[:20]}…"


def _probability(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise InvalidArgument(f"must be a number, got {_kind(raw)}", field=where)
    if not 0.0 <= raw <= 1.0:
        raise InvalidArgument(f"must be a probability in [0, 1], got {_short(raw)}", field=where)
    return float(raw)


def _kind(raw: Any) -> str:
    if raw is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: repr(raw), bool: str(raw).lower()}.get(
        type(raw), repr(raw)
    )
