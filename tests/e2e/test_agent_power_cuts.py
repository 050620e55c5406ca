"""Power cuts at random points of installs, on a real `ota-agent` over TLS gRPC.

One of three agents (the victim) is SIGKILLed, hooks and all, at random
moments while it works on a version, then started again, at least ten times
in all. The hook contract (README, "Device team") promises: install and
activate may run again after a power loss, never before the step they depend
on succeeded, and never again once the agent recorded their success. The
test holds the agent to exactly that, and to the right final state.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ota.devstack import DevStack
from ota.v1 import common_pb2, rollout_pb2
from tests.broker_harness import BrokerHandle
from tests.conftest import endpoint
from tests.e2e.agents import (
    AgentProcess,
    device_events,
    provision_agent,
    stop_all,
    wait_rollout,
    write_hooks,
)
from tests.e2e.scenario import wait_for
from tests.e2e.test_agent import FEATURE, client_for, publish, start_rollout

pytestmark = pytest.mark.e2e

MIN_CUTS = 10


@pytest.fixture
def tls_stack(tmp_path: Path, broker: BrokerHandle) -> Iterator[DevStack]:
    dev = DevStack.start(tmp_path / "stack", broker=endpoint(broker), tls=True)
    try:
        yield dev
    finally:
        dev.stop()


def mentions(agent: AgentProcess, version: str) -> int:
    """How often this run's log and the hook log name `version`: it grows while it works."""
    return agent.log_since_start().count(f" {version}") + sum(
        version in line for line in agent.hook_lines()
    )


@pytest.mark.timeout(290)
def test_power_cuts_at_random_points_of_installs_end_in_the_right_state(
    tls_stack: DevStack, tmp_path: Path
) -> None:
    seed = int(os.environ.get("OTA_TEST_SEED", random.SystemRandom().randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"seed {seed} (OTA_TEST_SEED reproduces the cut points)")
    stack = tls_stack
    client = client_for(stack)
    hooks = write_hooks(tmp_path / "hooks")
    devices = tmp_path / "devices"
    victim = provision_agent(stack, devices, "car-0", hooks, env={"HOOK_SLEEP": "0.3"})
    others = [provision_agent(stack, devices, f"car-{i}", hooks) for i in (1, 2)]
    agents = [victim, *others]
    for agent in agents:
        agent.start()
    for agent in agents:
        agent.wait_following()
    cuts: Counter[str] = Counter()  # version -> power cuts before the victim said ACTIVE
    kills: Counter[str] = Counter()  # version -> every power cut while it was current
    bundles: dict[str, bytes] = {}
    try:
        for n in range(1, 8):
            if sum(cuts.values()) >= MIN_CUTS:
                break
            version = f"{n}.0.0"
            bundles[version] = publish(client, stack, tmp_path, version)
            rollout_id = start_rollout(client, version)

            def finished(rollout_id: str = rollout_id) -> bool:
                r = client.rollouts.GetRollout(
                    rollout_pb2.GetRolloutRequest(rollout_id=rollout_id),
                    metadata=client.metadata,
                )
                return r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED and dict(r.device_states) == {
                    "ACTIVE": 3
                }

            while cuts[version] < 5:
                before = mentions(victim, version)
                wait_for(
                    lambda v=version, b=before: mentions(victim, v) > b or finished(),  # type: ignore[misc]
                    what=f"the victim to work on {version}",
                    timeout=90,
                )
                if mentions(victim, version) == before:
                    break  # the victim is done with this version
                # A random point from here: a verification, a hook, a save, a report.
                threading_pause(rng.uniform(0.0, 0.5))
                done = f"{FEATURE} {version}: ACTIVE" in victim.log.read_text()
                victim.power_cut()
                kills[version] += 1
                if not done:
                    cuts[version] += 1
                victim.start()
            wait_rollout(
                client,
                rollout_id,
                lambda r: (
                    r.state == rollout_pb2.ROLLOUT_STATE_COMPLETED
                    and dict(r.device_states) == {"ACTIVE": 3}
                ),
                what=f"{version} ACTIVE on all three agents",
            )
        print(f"power cuts before ACTIVE, by version: {dict(cuts)}")
        assert sum(cuts.values()) >= MIN_CUTS, cuts

        # Once more with nothing to do: a settled version runs no hook again. (A clean
        # stop: a cut between ACTIVE and its record on disk would rightly re-run activate.)
        victim.wait_following()  # restarted after its last cut: past its start-up
        assert victim.stop() == 0
        settled = victim.hook_lines()
        victim.start()
        victim.wait_following()
        assert victim.hook_lines() == settled

        last = max(bundles, key=lambda v: int(v.split(".")[0]))
        for agent in agents:
            assert agent.current(FEATURE) == last
            for version, data in bundles.items():
                slot = agent.device_root / "slots" / FEATURE / version
                assert slot.read_bytes() == data, f"{agent.device_id} {version}"
            failed = [
                e for e in device_events(client, agent.device_id) if e.state == common_pb2.FAILED
            ]  # type: ignore[attr-defined]
            assert failed == [], f"{agent.device_id}: {failed}"
        for agent in others:
            expected = []
            previous = ""
            for version in bundles:
                expected += [
                    f"start install {FEATURE} {version} prev={previous}",
                    f"done install {FEATURE} {version}",
                    f"start activate {FEATURE} {version} prev={previous}",
                    f"done activate {FEATURE} {version}",
                ]
                previous = version
            assert agent.hook_lines() == expected
        print("\n".join(settled))
        check_victim_hooks(settled, list(bundles), kills)
    finally:
        stop_all(agents)
        client.close()


def check_victim_hooks(lines: list[str], versions: list[str], kills: Counter[str]) -> None:
    """Each version's hooks, in order: install until one succeeds, then activate until
    one succeeds; a re-run only where a power cut could have hit; nothing else."""
    seen_versions = [line.split()[3] for line in lines]
    assert seen_versions == sorted(seen_versions, key=versions.index), "versions interleaved"
    for version in versions:
        mine = [line.split()[:2] for line in lines if line.split()[3] == version]
        starts = Counter(hook for verb, hook in mine if verb == "start")
        assert set(starts) == {"install", "activate"}, mine
        assert starts["install"] <= kills[version] + 1, mine
        assert starts["activate"] <= kills[version] + 1, mine
        first_done_install = mine.index(["done", "install"])
        assert ["start", "activate"] not in mine[:first_done_install], mine
        assert ["start", "install"] not in mine[mine.index(["start", "activate"]) :], mine
        assert mine[-1] == ["done", "activate"], mine


def threading_pause(seconds: float) -> None:
    """The random cut point itself (not a wait for something to happen)."""
    import threading

    threading.Event().wait(seconds)
