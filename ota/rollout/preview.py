"""The dry run: from today's fleet, who each stage of a plan exposes, and who it leaves out.

Uses the same classification as the engine (`exposure.classify`), so what the
dry run promises is what the engine does with the fleet as it is now.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlmodel import Session

from ota.domain.plan import RolloutPlan
from ota.rollout.exposure import classify, exposed_at
from ota.store import bundles, rollouts
from ota.store.models import DeviceRow

DIMENSIONS = ("model", "region", "firmware")


@dataclass(frozen=True)
class Breakdown:
    dimension: str
    value: str
    devices: int


@dataclass(frozen=True)
class StagePreview:
    index: int
    label: str
    ppm: int
    # Devices exposed once this stage is reached (cumulative), and new at this stage.
    exposed: int
    new: int
    cohorts: tuple[Breakdown, ...]


@dataclass(frozen=True)
class PlanPreview:
    rollout_id: str
    plan_version: int
    fleet: int
    candidates: int
    excluded: dict[str, int]
    excluded_cohorts: dict[str, tuple[Breakdown, ...]]
    stages: tuple[StagePreview, ...]
    already_exposed: int


def _breakdown(devices: list[DeviceRow]) -> tuple[Breakdown, ...]:
    out: list[Breakdown] = []
    for dimension in DIMENSIONS:
        counts = Counter(str(getattr(d, dimension)) for d in devices)
        out.extend(Breakdown(dimension, v, n) for v, n in sorted(counts.items()))
    return tuple(out)


def preview_rollout(session: Session, rollout_id: str) -> PlanPreview:
    """Who each stage of the rollout's current plan exposes from the fleet as it is now."""
    rollout = rollouts.get_rollout(session, rollout_id)
    plan = RolloutPlan.from_json(rollout.stages_json, rollout.gate_json)
    bundle = bundles.get_bundle(session, rollout.bundle_name)
    devices = rollouts.fleet_devices(session)
    candidates, excluded = classify(devices, rollout, bundle, plan)
    salt = bytes.fromhex(rollout.salt_hex)
    stages: list[StagePreview] = []
    seen: set[str] = set()
    for i, stage in enumerate(plan.stages):
        reached = [c.device for c in candidates if exposed_at(c, salt, plan, i)]
        new = [d for d in reached if d.device_id not in seen]
        seen.update(d.device_id for d in new)
        stages.append(
            StagePreview(i, stage.label, stage.ppm, len(seen), len(new), _breakdown(reached))
        )
    return PlanPreview(
        rollout_id=rollout_id,
        plan_version=rollout.plan_version,
        fleet=len(devices),
        candidates=len(candidates),
        excluded={reason: len(ds) for reason, ds in excluded.items()},
        excluded_cohorts={reason: _breakdown(ds) for reason, ds in excluded.items()},
        stages=tuple(stages),
        already_exposed=len(rollouts.exposed_device_ids(session, rollout_id)),
    )
