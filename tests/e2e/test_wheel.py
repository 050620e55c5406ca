"""The package as an operator gets it: build the sdist and the wheel, install the wheel
into a fresh venv outside the checkout, and run its commands from there.

Everything runs with its working directory in a temporary directory and without
PYTHONPATH, so nothing can import the checkout instead of the installed package.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ota
from tests.e2e.scenario import wait_for

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Installed:
    venv: Path
    home: Path  # a working directory outside the checkout
    sdist: Path

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        return {**env, "PATH": f"{self.venv / 'bin'}:{env.get('PATH', '')}", **extra}

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            cwd=self.home,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=240,
            stdin=subprocess.DEVNULL,
            check=False,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # No flags: the sdist first, then the wheel built from the unpacked sdist, so a
    # file the sdist forgets breaks this build. No isolation: the build backend
    # (setuptools) comes from this venv, so building needs no network.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("ota-*.whl")
    (sdist,) = dist.glob("ota-*.tar.gz")
    venv = root / "venv"
    # The venv gets no pip of its own: this venv's pip installs into it (--python),
    # which saves bootstrapping one. Dependencies come from the index (or pip's
    # cache), as they would for an operator; --no-compile skips byte-compiling
    # thousands of files that these commands never import.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        cwd=root,
        check=True,
        timeout=120,
    )
    home = root / "home"
    home.mkdir()
    target = Installed(venv, home, sdist)
    pip = target.run(
        sys.executable, "-m", "pip", "--python", target.bin("python"), "install", "-q",
        "--no-compile", str(wheel),
    )  # fmt: skip
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return target


def test_the_installed_commands_run_from_the_wheel(installed: Installed) -> None:
    where = installed.run(installed.bin("python"), "-c", "import ota; print(ota.__file__)")
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout

    version = installed.run(installed.bin("ota"), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ota {ota.__version__}"

    # Every console script the wheel declares starts (each imports its whole CLI,
    # and with it the generated ota/v1 code).
    scripts = installed.run(
        installed.bin("python"),
        "-c",
        "from importlib.metadata import distribution;"
        "print('\\n'.join(e.name for e in distribution('ota').entry_points"
        " if e.group == 'console_scripts'))",
    )
    names = set(scripts.stdout.split())
    assert {"ota", "ota-sim", "ota-tuf-client", "ota-agent"} <= names, (
        scripts.stdout + scripts.stderr
    )
    for name in sorted(names):
        helped = installed.run(installed.bin(name), "--help")
        assert helped.returncode == 0, f"{name}: {helped.stderr}"
        assert helped.stdout.startswith(f"usage: {name}"), helped.stdout

    # The device side: the agent's runtime and the SDK import from the wheel.
    device = installed.run(installed.bin("python"), "-c", "import ota.agent.runtime, ota.device")
    assert device.returncode == 0, device.stderr

    # Only what the running code imports is installed: no benchmark or test tools.
    listed = installed.run(
        installed.bin("python"),
        "-c",
        "from importlib.metadata import distributions;"
        "print('\\n'.join(d.metadata['Name'].lower() for d in distributions()))",
    )
    packages = set(listed.stdout.split())
    assert {"grpcio", "protobuf", "sqlalchemy"} <= packages, listed.stdout + listed.stderr
    assert not packages & {"aiomqtt", "testcontainers", "pytest", "grpcio-tools", "psycopg"}

    # PostgreSQL without the extra: one line naming the extra, not a traceback.
    serve = installed.run(
        installed.bin("ota"), "serve", "--database-url", "postgresql://ota@127.0.0.1:1/ota"
    )
    assert serve.returncode == 1
    assert "postgres extra" in serve.stderr, serve.stderr
    assert "Traceback" not in serve.stderr, serve.stderr


def test_the_sdist_carries_the_protos_and_the_generated_code(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as sdist:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in sdist.getnames()}
    for proto in (REPO / "protos" / "ota" / "v1").glob("*.proto"):
        assert f"protos/ota/v1/{proto.name}" in names
        assert f"ota/v1/{proto.stem}_pb2.py" in names
        assert f"ota/v1/{proto.stem}_pb2.pyi" in names
        assert f"ota/v1/{proto.stem}_pb2_grpc.py" in names


@pytest.fixture
def dev_stack(installed: Installed, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    state = tmp_path / "dev"
    process = subprocess.Popen(
        [installed.bin("ota"), "dev", "--state-dir", str(state), "--port", "0"],
        cwd=installed.home,
        env=installed.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process, state
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_ota_dev_from_the_wheel_serves_and_stops_cleanly(
    installed: Installed, dev_stack: tuple[subprocess.Popen[str], Path]
) -> None:
    process, state = dev_stack
    env_file = state / "env"
    wait_for(
        lambda: (
            "OTA_TOKEN=" in (env_file.read_text() if env_file.exists() else "")
            or process.poll() is not None
        ),
        what="ota dev to write its env file",
        timeout=120,
    )
    assert process.poll() is None, process.stdout.read() if process.stdout else ""
    broker_pid = int((state / "broker" / "mosquitto.pid").read_text())
    # The subscription guard was compiled from the C source the wheel carries.
    assert "ota_subscribe_guard.so" in (state / "broker" / "mosquitto.conf").read_text()
    values = dict(
        line.removeprefix("export ").split("=", 1) for line in env_file.read_text().splitlines()
    )

    listed = installed.run(installed.bin("ota"), "bundle", "list", "--format", "json", **values)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {
        "bundles": [],
        "next_page_token": "",
    }  # a fresh stack, and the token was accepted

    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
    # The dashboard started from the templates and assets the wheel carries.
    assert "dashboard http://127.0.0.1:" in output, output
    with pytest.raises(ProcessLookupError):
        os.kill(broker_pid, 0)
