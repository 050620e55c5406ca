"""Plans as code: a YAML or JSON document into a validated rollout plan.

```yaml
feature: lane-assist
version: 2.0.0
selector: 'model in (ev6, ev9) and region = "eu"'
salt_from: r-1a2b3c4d            # optional: same canary cohort as that rollout
holdout: 10%                     # control group, top slice of hash space, at most 50%
approvers: [release-lead]        # besides admin, who may promote an approval stage
cohort: {name: internal, devices: [car-001, car-002], min_soak: 1h, advance: approval}
stages:
  - {exposure: 1%, min_soak: 30m, min_exposed: 5, deadline: 2h}
  - {exposure: 10%, advance: approval}
  - {exposure: 100%}
gates:
  - {metric: install_failure, max: 5%, min_sample: 5, action: pause}
  - {metric: crash_rate, max: 2%, versus_holdout: true, window: 1h, breaches_to_trip: 3,
     action: rollback}
  - {metric: offline_ratio, max: 30%, action: hold, observe_only: true}
maintenance_windows: [{days: [mon, tue, wed, thu], start: "01:00", end: "05:00"}]  # UTC
blackout_dates: [2026-12-24, 2026-12-25]
```

Every error names the field as the document spells it (`stages[1].exposure`),
unknown fields are refused, and JSON is read as the YAML subset it is. Shares
carry their unit (`10%`, `{ppm: 100000}` or `100000ppm`; `ota.domain.shares`),
every number is bounded (`ota.domain.plan`), and the document itself is bounded
in size and nesting before it is parsed (`ota.domain.documents`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from typing import Any

from ota.domain.documents import DocumentLimits, load_document
from ota.domain.durations import parse_duration
from ota.domain.plan import (
    DAYS,
    MAX_APPROVERS,
    MAX_BLACKOUT_DATES,
    MAX_BREACHES,
    MAX_COHORT_DEVICES,
    MAX_DEVICES,
    MAX_DURATION_SECONDS,
    MAX_GATES,
    MAX_STAGES,
    MAX_WINDOWS,
    Cohort,
    Gate,
    MaintenanceWindow,
    RolloutPlan,
    Stage,
    check_count,
    check_range,
)
from ota.domain.selector import Selector
from ota.domain.shares import parse_share
from ota.errors import InvalidArgument

_TOP = {
    "feature",
    "version",
    "selector",
    "salt_from",
    "holdout",
    "approvers",
    "cohort",
    "stages",
    "gates",
    "maintenance_windows",
    "blackout_dates",
}
_STAGE = {"exposure", "ppm", "name", "min_soak", "min_exposed", "deadline", "advance"}
_COHORT = {"name", "devices", "label", "min_soak", "min_exposed", "deadline", "advance"}
_GATE = {
    "metric",
    "max",
    "min_sample",
    "window",
    "breaches_to_trip",
    "action",
    "observe_only",
    "versus_holdout",
}
_WINDOW = {"days", "start", "end"}
# A plan is a page of text: 64 KiB holds a cohort of a thousand device ids.
PLAN_LIMITS = DocumentLimits(max_bytes=64 * 1024, max_depth=16, max_nodes=20_000)


@dataclass(frozen=True)
class PlanDocument:
    feature: str
    version: str
    selector: str
    plan: RolloutPlan


def parse_plan_document(text: str) -> PlanDocument:
    """Validate a plan file's text; every error names the field."""
    doc = load_document(text, field="plan", what="the plan", limits=PLAN_LIMITS)
    top = _mapping(doc, "plan", _TOP)
    feature = _text(top, "feature", "", required=True)
    version = _text(top, "version", "", required=True)
    selector = _text(top, "selector", "")
    Selector.parse(selector, field_name="selector")
    return PlanDocument(feature, version, selector, plan_from_mapping(top))


def plan_from_mapping(top: Mapping[str, Any]) -> RolloutPlan:
    """The plan part of a document (stages, gates, holdout, windows ...)."""
    stages_doc = top.get("stages")
    if not isinstance(stages_doc, list) or not stages_doc:
        raise InvalidArgument("a list of at least one stage is required", field="stages")
    check_count(stages_doc, MAX_STAGES, "stages")
    stages: list[Stage] = []
    if top.get("cohort") is not None:
        stages.append(_cohort_stage(_mapping(top["cohort"], "cohort", _COHORT)))
    offset = len(stages)
    # Which key each stage's share was written with: errors name that one.
    share_keys: list[str] = []
    for i, item in enumerate(stages_doc):
        stage_doc = _mapping(item, f"stages[{i}]", _STAGE)
        share_keys.append("ppm" if "ppm" in stage_doc else "exposure")
        stages.append(_stage(stage_doc, f"stages[{i}]"))
    gates_doc = top.get("gates")
    gates = (
        tuple(
            _gate(_mapping(g, f"gates[{i}]", _GATE), f"gates[{i}]")
            for i, g in enumerate(_bounded_list(gates_doc, "gates", MAX_GATES))
        )
        if gates_doc is not None
        else None
    )
    windows = tuple(
        _window(_mapping(w, f"maintenance_windows[{i}]", _WINDOW), f"maintenance_windows[{i}]")
        for i, w in enumerate(
            _bounded_list(top.get("maintenance_windows", []), "maintenance_windows", MAX_WINDOWS)
        )
    )
    blackout = tuple(
        _date(d, f"blackout_dates[{i}]")
        for i, d in enumerate(
            _bounded_list(top.get("blackout_dates", []), "blackout_dates", MAX_BLACKOUT_DATES)
        )
    )
    approvers = tuple(
        _item_text(a, f"approvers[{i}]")
        for i, a in enumerate(_bounded_list(top.get("approvers", []), "approvers", MAX_APPROVERS))
    )
    holdout = parse_share(top["holdout"], "holdout") if "holdout" in top else 0
    kwargs: dict[str, Any] = {
        "holdout_ppm": holdout,
        "windows": windows,
        "blackout_dates": blackout,
        "approvers": approvers,
        "salt_from": _text(top, "salt_from", ""),
    }
    if gates is not None:
        kwargs["gates"] = gates
    try:
        return RolloutPlan(tuple(stages), **kwargs)
    except InvalidArgument as exc:
        # The plan numbers stages after the cohort; the document numbers them without it.
        raise InvalidArgument(exc.message, field=_renumber(exc.field, offset, share_keys)) from exc


def _renumber(field: str | None, offset: int, share_keys: list[str]) -> str | None:
    """A plan's field as the document spells it: stages after the cohort, share keys."""
    match = re.match(r"^stages\[(\d+)\](.*)$", field or "")
    if match is None:
        return field
    index = int(match.group(1)) - offset
    if index < 0:
        return f"cohort{match.group(2)}"
    rest = match.group(2)
    if rest == ".ppm" and index < len(share_keys):
        rest = f".{share_keys[index]}"
    return f"stages[{index}]{rest}"


def _stage(doc: Mapping[str, Any], where: str) -> Stage:
    if ("exposure" in doc) == ("ppm" in doc):
        raise InvalidArgument(
            "give exactly one of exposure (e.g. exposure: 10%) or ppm (e.g. ppm: 100000)",
            field=where,
        )
    if "ppm" in doc:
        ppm = parse_share({"ppm": doc["ppm"]}, where)
        field = "ppm"
    else:
        ppm = parse_share(doc["exposure"], f"{where}.exposure")
        field = "exposure"
    if ppm == 0:
        raise InvalidArgument("a stage must expose more than 0%", field=f"{where}.{field}")
    return Stage(ppm=ppm, **_timing(doc, where), name=_text(doc, "name", where))


def _cohort_stage(doc: Mapping[str, Any]) -> Stage:
    devices = tuple(
        _item_text(d, f"cohort.devices[{i}]")
        for i, d in enumerate(
            _bounded_list(doc.get("devices", []), "cohort.devices", MAX_COHORT_DEVICES)
        )
    )
    try:
        cohort = Cohort(
            name=_text(doc, "name", "cohort") or "cohort",
            devices=devices,
            label=_text(doc, "label", "cohort"),
        )
    except InvalidArgument as exc:
        field = exc.field if exc.field and exc.field.startswith("cohort") else "cohort"
        raise InvalidArgument(exc.message, field=field) from exc
    return Stage(ppm=0, **_timing(doc, "cohort"), name=cohort.name, cohort=cohort)


def _timing(doc: Mapping[str, Any], where: str) -> dict[str, Any]:
    advance = _text(doc, "advance", where) or "auto"
    if advance not in ("auto", "approval"):
        raise InvalidArgument(
            f"must be auto or approval, got {advance!r}", field=f"{where}.advance"
        )
    return {
        "min_soak_seconds": _duration(doc.get("min_soak", 0), f"{where}.min_soak"),
        "min_exposed": (
            _int(doc, "min_exposed", where, high=MAX_DEVICES) if "min_exposed" in doc else 0
        ),
        "deadline_seconds": _duration(doc.get("deadline", 0), f"{where}.deadline"),
        "advance": advance,
    }


def _gate(doc: Mapping[str, Any], where: str) -> Gate:
    if "metric" not in doc:
        raise InvalidArgument(
            "every gate needs a metric (install_failure, crash_rate, feature_error_rate, "
            "offline_ratio)",
            field=f"{where}.metric",
        )
    if "max" not in doc:
        raise InvalidArgument(
            "the highest tolerated rate is required, e.g. 5%", field=f"{where}.max"
        )
    try:
        return Gate(
            metric=_text(doc, "metric", where),
            max_ppm=parse_share(doc["max"], f"{where}.max"),
            min_sample=(
                _int(doc, "min_sample", where, low=1, high=MAX_DEVICES)
                if "min_sample" in doc
                else 5
            ),
            window_seconds=_duration(doc.get("window", 0), f"{where}.window"),
            breaches_to_trip=(
                _int(doc, "breaches_to_trip", where, low=1, high=MAX_BREACHES)
                if "breaches_to_trip" in doc
                else 1
            ),
            action=_text(doc, "action", where) or "pause",
            observe_only=_bool(doc, "observe_only", where),
            versus_holdout=_bool(doc, "versus_holdout", where),
        )
    except InvalidArgument as exc:
        if exc.field and exc.field.startswith(where):
            raise
        raise InvalidArgument(exc.message, field=f"{where}.{exc.field}") from exc


def _window(doc: Mapping[str, Any], where: str) -> MaintenanceWindow:
    for name in ("days", "start", "end"):
        if name not in doc:
            raise InvalidArgument("is required", field=f"{where}.{name}")
    days = []
    for i, d in enumerate(_list(doc["days"], f"{where}.days")):
        name = str(d).strip().lower()[:3]
        if name not in DAYS:
            raise InvalidArgument(f"{d!r} is not a day (mon..sun)", field=f"{where}.days[{i}]")
        days.append(DAYS.index(name))
    try:
        return MaintenanceWindow(
            tuple(days),
            _minute(doc["start"], f"{where}.start"),
            _minute(doc["end"], f"{where}.end"),
        )
    except InvalidArgument as exc:
        raise InvalidArgument(exc.message, field=f"{where}.{exc.field}") from exc


def _mapping(value: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("must be a mapping of fields", field=where)
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        prefix = "" if where == "plan" else f"{where}."
        raise InvalidArgument(
            f"unknown field (known: {', '.join(sorted(allowed))})", field=f"{prefix}{unknown[0]}"
        )
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument("must be a list", field=where)
    return value


def _bounded_list(value: Any, where: str, high: int) -> list[Any]:
    items = _list(value, where)
    check_count(items, high, where)
    return items


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _item_text(value: Any, field: str) -> str:
    text = _text({"item": value}, "item", "", required=True, field=field)
    if not text:
        raise InvalidArgument("must not be empty", field=field)
    return text


def _text(
    doc: Mapping[str, Any], key: str, where: str, *, required: bool = False, field: str = ""
) -> str:
    value = doc.get(key)
    field = field or _name(where, key)
    if value is None:
        if required:
            raise InvalidArgument("is required", field=field)
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidArgument("must be text", field=field)
    return str(value).strip()


def _int(doc: Mapping[str, Any], key: str, where: str, *, high: int, low: int = 0) -> int:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"must be a whole number from {low} to {high}, got {value!r}", field=_name(where, key)
        )
    return check_range(value, low, high, _name(where, key))


def _bool(doc: Mapping[str, Any], key: str, where: str) -> bool:
    value = doc.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument("must be true or false", field=_name(where, key))
    return value


def _duration(value: Any, field: str) -> int:
    """A soak, deadline or gate window: at most a year."""
    return parse_duration(value, field=field, at_most=MAX_DURATION_SECONDS)


def _minute(value: Any, field: str) -> int:
    # YAML 1.1 reads an unquoted 01:00 as the sexagesimal integer 60 (minutes): accept it.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.match(r"^\s*(\d{1,2}):(\d{2})\s*$", str(value))
    if match is None or int(match.group(2)) > 59:
        raise InvalidArgument(f"give a time of day HH:MM (UTC), got {value!r}", field=field)
    return int(match.group(1)) * 60 + int(match.group(2))


def _date(value: Any, field: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise InvalidArgument(f"give a date YYYY-MM-DD, got {value!r}", field=field) from exc
