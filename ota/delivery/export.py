"""The repository as static files, for any web server, object store or CDN origin.

The layout is the origin's: ``metadata/N.<role>.json``, ``metadata/timestamp.json``
and ``targets/<dir>/<sha256>.<name>``. Export is incremental and safe to run
against a directory being served: files that exist are immutable and kept,
new ones appear by rename, and ``timestamp.json`` is written last, so a reader
never finds a timestamp that points at a snapshot not there yet.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from sqlmodel import col, select

from ota.errors import FailedPrecondition
from ota.store.models import BundleRow, TufMetadataRow
from ota.store.session import Store


@dataclass(frozen=True)
class ExportResult:
    metadata_written: int
    bundles_written: int
    kept: int
    timestamp_version: int


def export_repository(store: Store, blobs: Path, out: Path) -> ExportResult:
    metadata = out / "metadata"
    targets = out / "targets"
    metadata.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    written_md = written_bundles = kept = 0
    with store.transaction() as session:
        bundles = [
            (b.target_path, b.sha256)
            for b in session.exec(select(BundleRow).order_by(col(BundleRow.target_path)))
        ]
    for target_path, sha in bundles:
        parent, sep, name = target_path.rpartition("/")
        dest = targets / f"{parent}{sep}{sha}.{name}"
        source = blobs / sha
        if dest.exists():
            kept += 1
            continue
        if not source.is_file():
            raise FailedPrecondition(
                f"the bytes of {target_path} ({sha[:12]}) are missing from {blobs}",
                field="data_dir",
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        _place(dest, partial(shutil.copyfile, source))
        written_bundles += 1
    timestamp: tuple[int, bytes] | None = None
    with store.transaction() as session:
        rows = session.exec(
            select(TufMetadataRow.role, TufMetadataRow.version).order_by(
                col(TufMetadataRow.role), col(TufMetadataRow.version)
            )
        ).all()
    for role, version in rows:
        with store.transaction() as session:
            row = session.get(TufMetadataRow, (role, version))
            content = row.content if row is not None else b""
        if role == "timestamp":
            if timestamp is None or version > timestamp[0]:
                timestamp = (version, content)
            continue
        dest = metadata / f"{version}.{role}.json"
        if dest.exists():
            kept += 1
            continue
        _place(dest, partial(_write, content))
        written_md += 1
    if timestamp is None:
        raise FailedPrecondition("the repository has no timestamp; bootstrap it first")
    _place(metadata / "timestamp.json", partial(_write, timestamp[1]))
    return ExportResult(written_md + 1, written_bundles, kept, timestamp[0])


def _place(dest: Path, write: Callable[[Path], object]) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    write(tmp)
    os.replace(tmp, dest)


def _write(content: bytes, path: Path) -> None:
    path.write_bytes(content)
