"""Published bundles and the TUF metadata of the image repository."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session, col, select

from ota.errors import AlreadyExists, NotFound
from ota.store.models import BundleRow, TufMetadataRow
from ota.store.session import Store


def bundle_name(feature: str, version: str) -> str:
    return f"bundles/{feature}/{version}"


def add_bundle(
    session: Session,
    *,
    feature: str,
    version: str,
    target_path: str,
    sha256: str,
    length: int,
    models: Sequence[str],
    min_firmware: str,
    signer_keyids: Sequence[str],
    request_id: str | None,
    now: datetime,
) -> BundleRow:
    name = bundle_name(feature, version)
    if session.get(BundleRow, name) is not None:
        raise AlreadyExists(f"{name} is already published", field="version")
    row = BundleRow(
        name=name,
        feature=feature,
        version=version,
        target_path=target_path,
        sha256=sha256,
        length=length,
        models_json=json.dumps(list(models)),
        min_firmware=min_firmware,
        signer_keyids_json=json.dumps(list(signer_keyids)),
        request_id=request_id or None,
        created_at=now,
    )
    session.add(row)
    return row


def get_bundle(session: Session, name: str) -> BundleRow:
    row = session.get(BundleRow, name)
    if row is None:
        raise NotFound(f"{name} does not exist", field="name")
    return row


def bundle_by_request(session: Session, request_id: str) -> BundleRow | None:
    return session.exec(select(BundleRow).where(BundleRow.request_id == request_id)).first()


def bundle_by_target(session: Session, target_path: str) -> BundleRow | None:
    return session.exec(select(BundleRow).where(BundleRow.target_path == target_path)).first()


def list_bundles(session: Session, feature: str, *, after: str, limit: int) -> list[BundleRow]:
    query = select(BundleRow).where(col(BundleRow.name) > after)
    if feature:
        query = query.where(BundleRow.feature == feature)
    return list(session.exec(query.order_by(col(BundleRow.name)).limit(limit)))


class SqlMetadataStore:
    """TUF metadata kept in the database, so replicas serve the same versions."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get_metadata(self, role: str, version: int | None) -> bytes | None:
        with self._store.transaction() as session:
            query = select(TufMetadataRow).where(TufMetadataRow.role == role)
            if version is None:
                query = query.order_by(col(TufMetadataRow.version).desc()).limit(1)
            else:
                query = query.where(TufMetadataRow.version == version)
            row = session.exec(query).first()
            return row.content if row else None

    def put_metadata(self, role: str, version: int, content: bytes) -> None:
        with self._store.transaction() as session:
            session.merge(TufMetadataRow(role=role, version=version, content=content))
