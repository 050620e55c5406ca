"""Adoption means use: the report's usage figures equal what the simulated devices reported.

60 devices whose health samples report using the feature at a rate per model
(ev6 often, ev9 sometimes, niro never). Per segment, the report's "used"
devices, samples reporting a use and uses equal the simulator's own record,
per model, region, firmware and device label (labels overlap: a device may
carry two); the holdout, which does not run the feature, reports none. The comparison
is made once the devices stop using the feature, so both sides are final.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from device_sim.fleet import FleetSettings, SimulatedFleet
from device_sim.profile import FailureProfile, HealthProfile, compose_fleet
from ota.client import Client
from ota.devstack import DevStack
from ota.v1 import report_pb2, rollout_pb2
from tests.e2e.scenario import MODELS, REGIONS, create_from_plan, publish, report, wait_for

pytestmark = pytest.mark.e2e

KEY = "lane-assist@1.0.0"
PLAN = """
feature: lane-assist
version: 1.0.0
holdout: 10%
stages:
  - {exposure: 100%, min_soak: 1h}   # stays running: its samples keep counting
"""


def _recorded(fleet: SimulatedFleet, dimension: str) -> dict[str, tuple[int, int, int]]:
    """Per segment value: devices that used it, samples reporting a use, uses."""
    used: Counter[str] = Counter()
    samples: Counter[str] = Counter()
    uses: Counter[str] = Counter()
    for d in fleet.devices:
        value = getattr(d.profile, dimension)
        n = d.record.periodic_samples_used.get(KEY, 0)
        used[value] += n > 0
        samples[value] += n
        uses[value] += d.record.periodic_uses.get(KEY, 0)
    return {v: (used[v], samples[v], uses[v]) for v in used}


def _labelled(i: int) -> tuple[tuple[str, str], ...]:
    """Labels of the i-th device: a ring for each, a site for some, none for every fifth."""
    if i % 5 == 4:
        return ()
    ring = ("ring", "beta" if i % 3 == 0 else "prod")
    return (ring, ("site", "depot-a")) if i % 2 else (ring,)


def _recorded_by_label(fleet: SimulatedFleet) -> dict[str, tuple[int, int]]:
    """Per `key=value` label: devices carrying it, and those that used the feature."""
    devices: Counter[str] = Counter()
    used: Counter[str] = Counter()
    for d in fleet.devices:
        for k, v in d.profile.labels:
            devices[f"{k}={v}"] += 1
            used[f"{k}={v}"] += d.record.periodic_samples_used.get(KEY, 0) > 0
    return {name: (devices[name], used[name]) for name in devices}


def _reported_by_label(r: report_pb2.RolloutReport) -> dict[str, tuple[int, int]]:
    return {s.label: (s.exposed + s.holdout_devices, s.used) for s in r.labels}


def _reported(r: report_pb2.RolloutReport, dimension: str) -> dict[str, tuple[int, int]]:
    return {c.value: (c.used, c.samples_used) for c in r.cohorts if c.dimension == dimension}


def test_usage_per_segment_equals_what_the_devices_reported(
    stack: DevStack, tmp_path: Path
) -> None:
    profiles = compose_fleet(60, models=MODELS, regions=REGIONS, firmware="4.2.0")
    fleet = SimulatedFleet(
        [replace(p, labels=_labelled(i)) for i, p in enumerate(profiles)],
        FleetSettings(
            server=stack.server,
            admin_token=stack.admin_token,
            trusted_root=stack.keys.root_json.read_bytes(),
            state_dir=tmp_path / "devices",
            failures=FailureProfile(),
            health=HealthProfile(
                use_rates={("ev6", "*"): 0.9, ("ev9", "*"): 0.3, ("niro", "*"): 0.0}
            ),
            health_interval=1.0,
            seed=5,
        ),
    )
    fleet.start()
    client = Client.connect(stack.server, stack.admin_token)
    try:
        publish(client, stack, tmp_path, "1.0.0")
        rollout_id = create_from_plan(client, PLAN).rollout_id
        client.rollouts.StartRollout(
            rollout_pb2.RolloutCommandRequest(rollout_id=rollout_id), metadata=client.metadata
        )
        wait_for(
            lambda: (
                report(client, rollout_id).funnel[5].devices
                == report(client, rollout_id).exposed
                > 0
            ),
            what="every exposed device to be active",
            timeout=120,
        )
        wait_for(
            lambda: _recorded(fleet, "model").get("ev9", (0, 0, 0))[0] >= 4,
            what="a few ev9 devices to report using the feature",
            timeout=120,
        )
        # From now on the devices sample without using it: the uses they reported are
        # final once the samples in flight land (a device records a sample on its PUBACK).
        for d in fleet.devices:
            d.health = HealthProfile(d.health.rates)
        for dimension in ("model", "region", "firmware"):
            wait_for(
                lambda dimension=dimension: (
                    {  # type: ignore[misc]
                        v: counts[:2]
                        for v, counts in _recorded(fleet, dimension).items()
                        if counts[0]
                    }
                    == {
                        v: n
                        for v, n in _reported(report(client, rollout_id), dimension).items()
                        if n[0]
                    }
                ),
                what=f"the report's usage by {dimension} to equal the devices' record",
            )
        wait_for(
            lambda: _reported_by_label(report(client, rollout_id)) == _recorded_by_label(fleet),
            what="the report's devices and users per label to equal the devices' record",
        )
        r = report(client, rollout_id)
        by_label = {s.label: s for s in r.labels}
        assert set(by_label) == {"ring=beta", "ring=prod", "site=depot-a"}
        assert by_label["ring=prod"].used > 0 and by_label["ring=beta"].used > 0
        assert all(s.applied == s.exposed and s.holdout_used == 0 for s in r.labels)
        # Every labelled device carries one ring: the rings split the labelled devices.
        rings = [s for s in r.labels if s.label.startswith("ring=")]
        assert sum(s.exposed + s.holdout_devices for s in rings) == 48
        assert sum(s.holdout_devices for s in rings) <= r.exposure_gap.holdout
        by_model = {c.value: c for c in r.cohorts if c.dimension == "model"}
        assert by_model["ev6"].used > by_model["ev9"].used > 0
        assert by_model["niro"].used == 0 and by_model["niro"].samples_used == 0
        # Totals: the funnel's last step, the exposed group's uses, and the curve.
        recorded = _recorded(fleet, "model")
        assert r.funnel[-1].step == "USED"
        assert r.funnel[-1].devices == sum(u for u, _, _ in recorded.values())
        assert r.health.exposed.samples_used == sum(s for _, s, _ in recorded.values())
        assert r.health.exposed.uses == sum(n for _, _, n in recorded.values())
        assert r.adoption_curve[-1].used == r.funnel[-1].devices
        assert sum(p.samples_used for p in r.usage_curve) == r.health.exposed.samples_used
        # The holdout does not run the feature: its samples report no use.
        assert r.health.HasField("control") and r.health.control.samples > 0
        assert r.health.control.samples_used == 0
        assert r.health.control.devices == r.exposure_gap.holdout > 0
        assert all(c.holdout_devices_used == 0 for c in r.cohorts)
    finally:
        client.close()
        fleet.stop()
