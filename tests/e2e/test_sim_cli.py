"""`ota-sim run` as an operator runs it: a scenario file, the fleet split over two processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlmodel import select

from ota.devstack import DevStack
from ota.store.ingest import drop_counts
from ota.store.models import DeviceRow
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """
fleet:
  - {count: 5, model: ev6, region: eu, firmware: 4.2.0}
  - {count: 3, model: niro, region: us, firmware: 4.2.0}
misbehaving:
  - {kind: garbage, count: 1, messages: 2}
  - {kind: foreign_topic, model: niro, count: 1, messages: 1}
"""


@pytest.mark.timeout(240)
def test_a_scenario_on_two_processes_comes_online_as_one_fleet_and_misbehaves(
    stack: DevStack, tmp_path: Path
) -> None:
    scenario = tmp_path / "fleet.yaml"
    scenario.write_text(SCENARIO)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "device_sim.cli",
            "run",
            *("--scenario", str(scenario), "--processes", "2", "--json"),
            *("--server", stack.server, "--token", stack.admin_token),
            *("--root", str(stack.keys.root_json), "--state-dir", str(tmp_path / "devices")),
            *("--duration", "4", "--status-interval", "0.5"),
        ],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    online = next(line for line in lines if line["event"] == "online")
    assert online["devices"] == 8 and online["processes"] == 2
    assert sorted(p["devices"] for p in online["per_process"]) == [4, 4]
    assert online["rss_kib"] > online["rss_before_kib"] > 0
    statuses = [line for line in lines if line["event"] == "status"]
    assert statuses, proc.stdout
    # Garbage is taken by the broker and dropped by the control plane; writing to
    # another device's topic is refused by the broker's ACL.
    assert statuses[-1]["misbehaving"] == {"sent": {"garbage": 2}, "refused": {"foreign_topic": 1}}
    assert statuses[-1]["generations"] == {"0": 8}
    assert statuses[-1]["following"] == 8  # every device past its pull on connect

    def malformed() -> int:
        with stack.control_plane.store.transaction() as session:
            return drop_counts(session).get("malformed", 0)

    wait_for(lambda: malformed() == 2, what="the two garbage events dropped as malformed")
    # Both processes registered their own slice, with the scenario's models.
    with stack.control_plane.store.transaction() as session:
        models = {d.device_id: d.model for d in session.exec(select(DeviceRow))}
    assert models == {f"sim-{i:06d}": "ev6" if i < 5 else "niro" for i in range(8)}
