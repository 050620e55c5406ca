"""The conformance entry point against a static TUF repository served over real HTTP.

The repository is built here with python-tuf (root, targets with one target,
snapshot, timestamp; consistent snapshots) and served by `http.server` on a
free port. `python -m device_sim.conformance` runs as a child process, as the
TUF conformance suite runs a client: only exit codes, the metadata directory,
the target directory and the HTTP requests are observed.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
TARGET = "lane-assist/1.0.0.bundle"
PAYLOAD = bytes(range(256)) * 40
ROLES = ("root", "targets", "snapshot", "timestamp")


@dataclass
class StaticRepository:
    """A TUF repository as files under `root/metadata` and `root/targets`."""

    root: Path
    signers: dict[str, CryptoSigner] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def metadata(self) -> Path:
        return self.root / "metadata"

    @property
    def targets(self) -> Path:
        return self.root / "targets"

    def build(self, files: dict[str, bytes], *, expires: datetime) -> None:
        self.metadata.mkdir(parents=True)
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        root = Root(expires=expires, consistent_snapshot=True)
        for role, signer in self.signers.items():
            root.add_key(signer.public_key, role)
        self._write("root", Metadata(root), versioned=True)
        targets = Targets(expires=expires)
        for name, data in files.items():
            info = TargetFile.from_data(name, data, ["sha256"])
            targets.targets[name] = info
            stored = self.target_file(info)
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_bytes(data)
        self._write("targets", Metadata(targets), versioned=True)
        snapshot = Snapshot(expires=expires)
        snapshot.meta["targets.json"] = MetaFile(version=targets.version)
        self._write("snapshot", Metadata(snapshot), versioned=True)
        self.new_timestamp(expires=expires)

    def new_timestamp(self, *, expires: datetime, signer: CryptoSigner | None = None) -> None:
        """Publish timestamp version n+1 (signed by `signer`, else the timestamp key)."""
        timestamp = Timestamp(
            version=self.versions.get("timestamp", 0) + 1,
            expires=expires,
            snapshot_meta=MetaFile(version=self.versions["snapshot"]),
        )
        self._write("timestamp", Metadata(timestamp), versioned=False, signer=signer)

    def target_file(self, info: TargetFile) -> Path:
        parent, _, base = info.path.rpartition("/")
        return self.targets / parent / f"{info.hashes['sha256']}.{base}"

    def _write(
        self, role: str, md: Metadata[Any], *, versioned: bool, signer: CryptoSigner | None = None
    ) -> None:
        md.sign(signer or self.signers[role])
        self.versions[role] = md.signed.version
        name = f"{md.signed.version}.{role}.json" if versioned else f"{role}.json"
        (self.metadata / name).write_bytes(md.to_bytes())


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


@dataclass
class Served:
    repo: StaticRepository
    url: str
    requests: list[str]
    work: Path

    @property
    def metadata_dir(self) -> Path:
        return self.work / "client-metadata"

    @property
    def target_dir(self) -> Path:
        return self.work / "client-targets"

    def client(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "device_sim.conformance", *args],
            cwd=PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def init(self) -> subprocess.CompletedProcess[str]:
        self.metadata_dir.mkdir(exist_ok=True)
        root = self.work / "initial_root.json"
        root.write_bytes((self.repo.metadata / "1.root.json").read_bytes())
        return self.client("--metadata-dir", str(self.metadata_dir), "init", str(root))

    def refresh(self) -> subprocess.CompletedProcess[str]:
        return self.client(
            "--metadata-dir",
            str(self.metadata_dir),
            "--metadata-url",
            f"{self.url}/metadata",
            "refresh",
        )

    def download(self, name: str = TARGET) -> subprocess.CompletedProcess[str]:
        # Argument order as the suite's client runner passes them.
        return self.client(
            "--metadata-url",
            f"{self.url}/metadata",
            "--metadata-dir",
            str(self.metadata_dir),
            "--target-name",
            name,
            "--target-dir",
            str(self.target_dir),
            "--target-base-url",
            f"{self.url}/targets",
            "download",
        )

    def downloaded(self) -> dict[str, bytes]:
        if not self.target_dir.exists():
            return {}
        return {p.name: p.read_bytes() for p in self.target_dir.rglob("*") if p.is_file()}

    def target_requests(self) -> list[str]:
        return [r for r in self.requests if r.startswith("/targets/")]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    repo = StaticRepository(tmp_path / "repo")
    repo.build({TARGET: PAYLOAD}, expires=datetime.now(UTC) + timedelta(days=7))
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(repo.root))
    )
    thread = threading.Thread(target=server.serve_forever, name="tuf-http", daemon=True)
    thread.start()
    try:
        yield Served(repo, f"http://127.0.0.1:{server.server_port}", requests, tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr


def test_init_refresh_and_download_a_target(served: Served) -> None:
    _ok(served.init())
    assert served.requests == []  # init makes no request
    assert (served.metadata_dir / "root.json").is_file()

    _ok(served.refresh())
    for role in ("root", "timestamp", "snapshot", "targets"):
        assert (served.metadata_dir / f"{role}.json").exists(), role
    # Consistent snapshots: versioned snapshot and targets, unversioned timestamp.
    assert "/metadata/timestamp.json" in served.requests
    assert "/metadata/1.snapshot.json" in served.requests
    assert "/metadata/1.targets.json" in served.requests

    _ok(served.download())
    assert list(served.downloaded().values()) == [PAYLOAD]
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert served.target_requests() == [f"/targets/lane-assist/{digest}.1.0.0.bundle"]


def test_a_verified_target_is_not_downloaded_twice(served: Served) -> None:
    _ok(served.init())
    _ok(served.download())
    _ok(served.download())
    assert len(served.target_requests()) == 1
    assert list(served.downloaded().values()) == [PAYLOAD]


def test_a_tampered_target_fails_the_download_and_is_not_kept(served: Served) -> None:
    _ok(served.init())
    info = TargetFile.from_data(TARGET, PAYLOAD, ["sha256"])
    served.repo.target_file(info).write_bytes(bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:])

    result = served.download()

    assert result.returncode != 0
    assert "HASH_MISMATCH" in result.stderr
    assert served.downloaded() == {}


def test_a_target_the_repository_did_not_sign_fails(served: Served) -> None:
    _ok(served.init())
    result = served.download("lane-assist/9.9.9.bundle")
    assert result.returncode != 0
    assert served.target_requests() == []


def test_an_expired_timestamp_fails_the_refresh(served: Served) -> None:
    _ok(served.init())
    served.repo.new_timestamp(expires=datetime.now(UTC) - timedelta(minutes=1))
    result = served.refresh()
    assert result.returncode != 0
    assert "METADATA_EXPIRED" in result.stderr
    assert not (served.metadata_dir / "timestamp.json").exists()


def test_a_timestamp_signed_by_an_unknown_key_fails_and_is_not_trusted(served: Served) -> None:
    _ok(served.init())
    _ok(served.refresh())
    trusted = (served.metadata_dir / "timestamp.json").read_bytes()
    served.repo.new_timestamp(
        expires=datetime.now(UTC) + timedelta(days=1), signer=CryptoSigner.generate_ed25519()
    )
    result = served.refresh()
    assert result.returncode != 0
    assert "SIGNATURE_INVALID" in result.stderr
    assert (served.metadata_dir / "timestamp.json").read_bytes() == trusted


def test_usage_errors_exit_non_zero(served: Served) -> None:
    assert served.client("--metadata-dir", str(served.metadata_dir), "refresh").returncode != 0
    assert served.client("refresh").returncode != 0
    missing = served.client("--metadata-dir", str(served.metadata_dir), "init", "/nonexistent")
    assert missing.returncode == 1
