"""The device SDK and the agent load nothing of the control plane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# The database, the gRPC server modules (ota.api; grpcio itself imports its health
# and reflection packages, so they say nothing), the control plane's repository and
# the rest of the server, offline signing, and the simulator.
FORBIDDEN = (
    "sqlalchemy",
    "sqlmodel",
    "alembic",
    "ota.api",
    "ota.trust",
    "ota.store",
    "ota.rollout",
    "ota.app",
    "ota.signing",
    "device_sim",
)


@pytest.mark.parametrize("module", ["ota.device", "ota.agent.runtime", "ota.agent.cli"])
def test_importing_it_loads_no_control_plane_code(module: str) -> None:
    code = f"import json, sys, {module}\nprint(json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(proc.stdout)
    assert module in loaded
    leaked = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert leaked == []
