"""A rollout plan: stages of exposure, the gates that guard them, and when it may expose.

Values validate themselves on construction and name the offending field the
way a plan file spells it (`stages[1].ppm`, `gates[0].metric`), so a bad plan
is refused wherever it comes from: a plan file, the gRPC call or an edit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import date, datetime
from typing import Any

from ota.domain.bucketing import HOLDOUT_MAX_PPM, PPM_MAX, check_ppm
from ota.domain.shares import parse_share, share_text
from ota.errors import InvalidArgument

GATE_ACTIONS = ("pause", "hold", "rollback")
ADVANCE_MODES = ("auto", "approval")
# install_failure: failed / finished; crash_rate and feature_error_rate: devices whose
# health samples report a crash (error) / devices sampled; offline_ratio: exposed
# devices offline / exposed (offline is not failure, but a fleet going dark is news).
METRICS = ("install_failure", "crash_rate", "feature_error_rate", "offline_ratio")
HEALTH_METRICS = ("crash_rate", "feature_error_rate")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# Bounds of a plan's values: each fits its wire type (uint32 in ota.v1.Stage and
# FailureGate) with room to spare, and the range a rollout can sensibly use.
MAX_DURATION_SECONDS = 365 * 86_400  # soak, deadline, gate window: at most a year
MAX_DEVICES = 100_000_000  # min_exposed, min_sample
MAX_BREACHES = 1_000  # breaches_to_trip
MAX_STAGES = 100
MAX_GATES = 32
MAX_COHORT_DEVICES = 1_000
MAX_APPROVERS = 100
MAX_WINDOWS = 50
MAX_BLACKOUT_DATES = 1_000
MAX_NAME = 128  # stage and cohort names, labels, approvers, device ids (the device_id width)


# Set while a stored plan is read back: the bounds judge new input, and a row written
# before they existed must stay readable (the API clamps what its wire types cannot hold).
_READING_STORED: ContextVar[bool] = ContextVar("reading_stored", default=False)


def check_range(value: int, low: int, high: int, field: str, *, unit: str = "") -> int:
    """`value` within [low, high], or InvalidArgument naming `field` and the bounds."""
    if not low <= value <= high and not _READING_STORED.get():
        shown = (lambda n: f"{n} {unit}") if unit else str
        raise InvalidArgument(
            f"must be between {shown(low)} and {shown(high)}, got {shown(value)}", field=field
        )
    return value


def check_count(items: tuple[object, ...] | list[object], high: int, field: str) -> None:
    if len(items) > high and not _READING_STORED.get():
        raise InvalidArgument(f"may list at most {high}, got {len(items)}", field=field)


def check_name(text: str, field: str) -> str:
    if (len(text) > MAX_NAME or not text.isprintable()) and not _READING_STORED.get():
        raise InvalidArgument(
            f"must be at most {MAX_NAME} printable characters, got {len(text)}", field=field
        )
    return text


@dataclass(frozen=True)
class Cohort:
    """An explicit first cohort: named devices, or every device carrying a label."""

    name: str = "cohort"
    devices: tuple[str, ...] = ()
    label: str = ""  # "key=value"

    def __post_init__(self) -> None:
        if bool(self.devices) == bool(self.label):
            raise InvalidArgument("give either devices or label (not both)", field="cohort")
        if self.label and "=" not in self.label:
            raise InvalidArgument(f"must read key=value, got {self.label!r}", field="cohort.label")
        check_name(self.name, "cohort.name")
        check_name(self.label, "cohort.label")
        check_count(self.devices, MAX_COHORT_DEVICES, "cohort.devices")
        for i, device in enumerate(self.devices):
            check_name(device, f"cohort.devices[{i}]")

    def contains(self, device_id: str, labels: Mapping[str, str]) -> bool:
        if self.devices:
            return device_id in self.devices
        key, _, value = self.label.partition("=")
        return labels.get(key.strip()) == value.strip()


@dataclass(frozen=True)
class Stage:
    ppm: int
    min_soak_seconds: int = 0
    # The stage waits until at least this many devices are exposed (in all), until its deadline.
    min_exposed: int = 0
    # Seconds after the stage starts by which it must be ready to advance; 0 = none.
    deadline_seconds: int = 0
    advance: str = "auto"
    name: str = ""
    # Only on the first stage: it exposes exactly these devices (ppm 0).
    cohort: Cohort | None = None

    @property
    def label(self) -> str:
        if self.cohort is not None:
            return self.name or self.cohort.name
        return self.name or share_text(self.ppm)


@dataclass(frozen=True)
class Gate:
    """A rule on evidence: trips when bad / sample exceeds `max_ppm` with `min_sample` seen.

    With `versus_holdout`, a health gate compares the exposed devices' rate with
    the holdout's: it trips when the difference exceeds `max_ppm`.
    """

    metric: str
    max_ppm: int
    min_sample: int = 5
    # Evidence younger than this many seconds (and newer than the stage start); 0 = whole stage.
    window_seconds: int = 0
    # Successive evaluations in breach, each on new evidence, before the action is taken.
    breaches_to_trip: int = 1
    action: str = "pause"
    observe_only: bool = False
    versus_holdout: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidArgument(f"must be one of {', '.join(METRICS)}", field="metric")
        check_ppm(self.max_ppm, field="max")
        check_range(self.min_sample, 1, MAX_DEVICES, "min_sample")
        check_range(self.window_seconds, 0, MAX_DURATION_SECONDS, "window", unit="s")
        check_range(self.breaches_to_trip, 1, MAX_BREACHES, "breaches_to_trip")
        if self.action not in GATE_ACTIONS:
            raise InvalidArgument(f"must be one of {', '.join(GATE_ACTIONS)}", field="action")
        if self.versus_holdout and self.metric not in HEALTH_METRICS:
            raise InvalidArgument(
                "only health gates (crash_rate, feature_error_rate) compare with the holdout",
                field="versus_holdout",
            )

    @property
    def key(self) -> str:
        return f"{self.metric}:{self.max_ppm}:{self.action}"

    def breached(
        self, bad: int, sample: int, *, control_bad: int = 0, control_sample: int = 0
    ) -> bool:
        if sample < self.min_sample:
            return False
        if self.versus_holdout:
            if control_sample < self.min_sample:
                return False
            # bad/sample - control_bad/control_sample > max_ppm / PPM_MAX, in integers
            excess = (bad * control_sample - control_bad * sample) * PPM_MAX
            return excess > self.max_ppm * sample * control_sample
        return bad * PPM_MAX > self.max_ppm * sample


def install_failure_gate(
    max_failure_ppm: int = 50_000, min_sample: int = 5, action: str = "pause"
) -> Gate:
    """The install-failure gate (what `--max-failure` builds)."""
    return Gate("install_failure", max_failure_ppm, min_sample, action=action)


@dataclass(frozen=True)
class MaintenanceWindow:
    """Days of the week and a time of day (UTC) when new devices may be exposed.

    `end` before `start` wraps past midnight (22:00-04:00 runs into the next day).
    """

    days: tuple[int, ...]  # 0 = Monday
    start_minute: int
    end_minute: int

    def __post_init__(self) -> None:
        if not self.days or any(not 0 <= d <= 6 for d in self.days):
            raise InvalidArgument("name days mon..sun", field="days")
        for name, minute in (("start", self.start_minute), ("end", self.end_minute)):
            if not 0 <= minute <= 24 * 60:
                raise InvalidArgument("must be HH:MM between 00:00 and 24:00", field=name)
        if self.start_minute == self.end_minute:
            raise InvalidArgument("a window must not be empty", field="end")

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        if self.start_minute < self.end_minute:
            return when.weekday() in self.days and self.start_minute <= minute < self.end_minute
        # Wraps midnight: the part after midnight belongs to the previous day's window.
        if minute >= self.start_minute:
            return when.weekday() in self.days
        return minute < self.end_minute and (when.weekday() - 1) % 7 in self.days


DEFAULT_GATES = (install_failure_gate(),)


@dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[Stage, ...]
    gates: tuple[Gate, ...] = DEFAULT_GATES
    holdout_ppm: int = 0
    windows: tuple[MaintenanceWindow, ...] = ()
    blackout_dates: tuple[date, ...] = ()
    # Token names or roles (besides admin) that may promote an approval stage.
    approvers: tuple[str, ...] = ()
    # Copy the salt of this earlier rollout of the same feature: same canary cohort.
    salt_from: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise InvalidArgument("a rollout needs at least one stage", field="stages")
        check_count(self.stages, MAX_STAGES, "stages")
        check_count(self.gates, MAX_GATES, "gates")
        check_count(self.windows, MAX_WINDOWS, "maintenance_windows")
        check_count(self.blackout_dates, MAX_BLACKOUT_DATES, "blackout_dates")
        check_count(self.approvers, MAX_APPROVERS, "approvers")
        for i, approver in enumerate(self.approvers):
            check_name(approver, f"approvers[{i}]")
        check_name(self.salt_from, "salt_from")
        previous = 0
        for i, stage in enumerate(self.stages):
            _check_stage(i, stage, previous, last=i == len(self.stages) - 1)
            previous = stage.ppm
        if not 0 <= self.holdout_ppm <= HOLDOUT_MAX_PPM:
            raise InvalidArgument(
                f"must be between 0% and {share_text(HOLDOUT_MAX_PPM)}, "
                f"got {share_text(self.holdout_ppm)}",
                field="holdout",
            )
        for i, gate in enumerate(self.gates):
            if gate.versus_holdout and not self.holdout_ppm:
                raise InvalidArgument(
                    "compares with the holdout, but the plan sets none",
                    field=f"gates[{i}].versus_holdout",
                )

    @property
    def cohort(self) -> Cohort | None:
        return self.stages[0].cohort

    def exposure_allowed(self, now: datetime) -> bool:
        """Inside a maintenance window (when any is set) and not on a blackout date."""
        if now.date() in self.blackout_dates:
            return False
        return not self.windows or any(w.contains(now) for w in self.windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [_stage_dict(s) for s in self.stages],
            "gates": [_gate_dict(g) for g in self.gates],
            "holdout_ppm": self.holdout_ppm,
            "windows": [
                {"days": list(w.days), "start_minute": w.start_minute, "end_minute": w.end_minute}
                for w in self.windows
            ],
            "blackout_dates": [d.isoformat() for d in self.blackout_dates],
            "approvers": list(self.approvers),
            "salt_from": self.salt_from,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RolloutPlan:
        """The stored form (`to_dict`), trusted: it was validated when it was written."""
        reading = _READING_STORED.set(True)
        try:
            return cls._from_stored(doc)
        finally:
            _READING_STORED.reset(reading)

    @classmethod
    def _from_stored(cls, doc: Mapping[str, Any]) -> RolloutPlan:
        stages = []
        for stored in doc["stages"]:
            s = dict(stored)
            cohort = s.pop("cohort", None)
            stages.append(
                Stage(**s, cohort=Cohort(cohort["name"], tuple(cohort["devices"]), cohort["label"]))
                if cohort
                else Stage(**s)
            )
        return cls(
            stages=tuple(stages),
            gates=tuple(Gate(**g) for g in doc.get("gates", [])),
            holdout_ppm=int(doc.get("holdout_ppm", 0)),
            windows=tuple(
                MaintenanceWindow(tuple(w["days"]), w["start_minute"], w["end_minute"])
                for w in doc.get("windows", [])
            ),
            blackout_dates=tuple(date.fromisoformat(d) for d in doc.get("blackout_dates", [])),
            approvers=tuple(doc.get("approvers", [])),
            salt_from=str(doc.get("salt_from", "")),
        )

    # The rollout row keeps the stages and the rest of the plan as two JSON texts.
    def stages_json(self) -> str:
        return json.dumps(self.to_dict()["stages"])

    def gate_json(self) -> str:
        rest = self.to_dict()
        del rest["stages"]
        return json.dumps(rest, sort_keys=True)

    @classmethod
    def from_json(cls, stages_json: str, gate_json: str) -> RolloutPlan:
        rest = json.loads(gate_json)
        if "max_failure_ppm" in rest:  # a row written before plans had several gates
            rest = {"gates": [_gate_dict(install_failure_gate(**rest))]}
        return cls.from_dict({"stages": json.loads(stages_json), **rest})

    def with_stages(self, stages: tuple[Stage, ...]) -> RolloutPlan:
        return replace(self, stages=stages)


def _check_stage(i: int, stage: Stage, previous: int, *, last: bool) -> None:
    where = f"stages[{i}]"
    check_ppm(stage.ppm, field=f"{where}.ppm")
    if stage.cohort is not None:
        if i != 0:
            raise InvalidArgument("only the first stage may be a named cohort", field=where)
        if stage.ppm != 0:
            raise InvalidArgument("a cohort stage exposes its devices, not a ppm", field=where)
    elif stage.ppm == 0:
        raise InvalidArgument("a stage must expose more than 0%", field=f"{where}.ppm")
    if stage.ppm < previous:
        raise InvalidArgument(
            f"exposure must not decrease: {share_text(stage.ppm)} after {share_text(previous)}",
            field=f"{where}.ppm",
        )
    check_range(stage.min_soak_seconds, 0, MAX_DURATION_SECONDS, f"{where}.min_soak_seconds")
    check_range(stage.deadline_seconds, 0, MAX_DURATION_SECONDS, f"{where}.deadline_seconds")
    check_range(stage.min_exposed, 0, MAX_DEVICES, f"{where}.min_exposed")
    check_name(stage.name, f"{where}.name")
    if stage.advance not in ADVANCE_MODES:
        raise InvalidArgument(
            f"must be one of {', '.join(ADVANCE_MODES)}, got {stage.advance!r}",
            field=f"{where}.advance",
        )
    if last and stage.advance == "approval":
        raise InvalidArgument(
            "the last stage has no next stage to approve", field=f"{where}.advance"
        )


def _stage_dict(s: Stage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ppm": s.ppm,
        "min_soak_seconds": s.min_soak_seconds,
        "min_exposed": s.min_exposed,
        "deadline_seconds": s.deadline_seconds,
        "advance": s.advance,
        "name": s.name,
    }
    if s.cohort is not None:
        out["cohort"] = {
            "name": s.cohort.name,
            "devices": list(s.cohort.devices),
            "label": s.cohort.label,
        }
    return out


def _gate_dict(g: Gate) -> dict[str, Any]:
    return {
        "metric": g.metric,
        "max_ppm": g.max_ppm,
        "min_sample": g.min_sample,
        "window_seconds": g.window_seconds,
        "breaches_to_trip": g.breaches_to_trip,
        "action": g.action,
        "observe_only": g.observe_only,
        "versus_holdout": g.versus_holdout,
    }


def parse_stages(text: str, *, soak_seconds: int = 0, field: str = "--stages") -> tuple[Stage, ...]:
    """Parse `1%,10%,100%` (or `10000ppm,100000ppm,1000000ppm`): each share with its unit."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_STAGES:
        raise InvalidArgument(
            f"may list at most {MAX_STAGES} stages, got {len(parts)}", field=field
        )
    return tuple(
        Stage(ppm=parse_share(part, field, mapping=False), min_soak_seconds=soak_seconds)
        for part in parts
    )
