"""A rollout plan: ordered stages of exposure and the gate that guards them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ota.domain.bucketing import PPM_MAX, check_ppm
from ota.errors import InvalidArgument

GATE_ACTIONS = ("pause", "rollback")


@dataclass(frozen=True)
class Stage:
    ppm: int
    min_soak_seconds: int = 0


@dataclass(frozen=True)
class FailureGate:
    """Trips when failed / finished exceeds `max_failure_ppm` with `min_sample` finished."""

    max_failure_ppm: int = 50_000
    min_sample: int = 5
    action: str = "pause"

    def __post_init__(self) -> None:
        check_ppm(self.max_failure_ppm, field="gate.max_failure_ppm")
        if self.min_sample < 1:
            raise InvalidArgument("must be at least 1", field="gate.min_sample")
        if self.action not in GATE_ACTIONS:
            raise InvalidArgument(f"must be one of {', '.join(GATE_ACTIONS)}", field="gate.action")

    def breached(self, failed: int, finished: int) -> bool:
        return finished >= self.min_sample and failed * PPM_MAX > self.max_failure_ppm * finished


@dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[Stage, ...]
    gate: FailureGate

    def __post_init__(self) -> None:
        if not self.stages:
            raise InvalidArgument("a rollout needs at least one stage", field="stages")
        previous = 0
        for i, stage in enumerate(self.stages):
            check_ppm(stage.ppm, field=f"stages[{i}].ppm")
            if stage.ppm == 0:
                raise InvalidArgument(
                    "a stage must expose more than 0 ppm", field=f"stages[{i}].ppm"
                )
            if stage.ppm < previous:
                raise InvalidArgument(
                    f"stages must not decrease: {stage.ppm} ppm after {previous} ppm",
                    field=f"stages[{i}].ppm",
                )
            if stage.min_soak_seconds < 0:
                raise InvalidArgument("must not be negative", field=f"stages[{i}].min_soak_seconds")
            previous = stage.ppm

    def stages_json(self) -> str:
        return json.dumps([asdict(s) for s in self.stages])

    def gate_json(self) -> str:
        return json.dumps(asdict(self.gate))

    @classmethod
    def from_json(cls, stages_json: str, gate_json: str) -> RolloutPlan:
        stages = tuple(Stage(**s) for s in json.loads(stages_json))
        return cls(stages, FailureGate(**json.loads(gate_json)))


def parse_stages(text: str, *, soak_seconds: int = 0) -> tuple[Stage, ...]:
    """Parse `1%,10%,100%` (or ppm figures `10000,100000,1000000`)."""
    stages: list[Stage] = []
    for i, part in enumerate(p.strip() for p in text.split(",")):
        try:
            ppm = round(float(part[:-1]) * 10_000) if part.endswith("%") else int(part)
        except ValueError as exc:
            raise InvalidArgument(
                f"{part!r} is not a percentage or ppm", field=f"stages[{i}]"
            ) from exc
        stages.append(Stage(ppm=ppm, min_soak_seconds=soak_seconds))
    return tuple(stages)
