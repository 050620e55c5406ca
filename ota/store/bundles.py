"""Published and pending bundles, and the TUF metadata of the image repository.

A bundle name lives in one table at a time: `pending_bundle` while release
signatures are missing, `bundle` once the targets devices fetch carry it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from ota.domain.compatibility import Compatibility
from ota.domain.webhooks import KEYS_ROTATED, ordering_key
from ota.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from ota.store import audit, webhooks
from ota.store.models import BundleRow, PendingBundleRow, TufMetadataRow
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
    """The published bundle `name`; a pending one is FailedPrecondition, not NotFound."""
    row = session.get(BundleRow, name)
    if row is None:
        pending = session.get(PendingBundleRow, name)
        if pending is not None:
            signers = len(json.loads(pending.signer_keyids_json))
            raise FailedPrecondition(
                f"{name} is not published yet: it has {signers} release signature(s) and "
                f"waits for more (`ota bundle sign {name} --key KEY`)",
                field="name",
            )
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


def set_signers(session: Session, signer_keyids: Sequence[str]) -> None:
    """Record new signers on every published bundle (targets re-signed by new release keys)."""
    for row in session.exec(select(BundleRow)):
        row.signer_keyids_json = json.dumps(list(signer_keyids))
        session.add(row)


def sha256_in_use(session: Session, sha256: str) -> bool:
    """Whether a published or pending bundle keeps bytes with this digest."""
    return any(
        session.exec(select(table.name).where(table.sha256 == sha256).limit(1)).first()
        for table in (BundleRow, PendingBundleRow)
    )


# -- pending publications ---------------------------------------------------------------


def add_pending(
    session: Session,
    *,
    feature: str,
    version: str,
    target_path: str,
    sha256: str,
    length: int,
    models: Sequence[str],
    min_firmware: str,
    targets_version: int,
    signed_targets: bytes,
    signer_keyids: Sequence[str],
    request_id: str | None,
    now: datetime,
) -> PendingBundleRow:
    """Keep a publication that waits for release signatures (replaces nothing)."""
    name = bundle_name(feature, version)
    if session.get(BundleRow, name) is not None:
        raise AlreadyExists(f"{name} is already published", field="version")
    if session.get(PendingBundleRow, name) is not None:
        raise AlreadyExists(f"{name} is already pending", field="version")
    row = PendingBundleRow(
        name=name,
        feature=feature,
        version=version,
        target_path=target_path,
        sha256=sha256,
        length=length,
        models_json=json.dumps(list(models)),
        min_firmware=min_firmware,
        targets_version=targets_version,
        signed_targets=signed_targets,
        signer_keyids_json=json.dumps(list(signer_keyids)),
        request_id=request_id or None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    return row


def get_pending(session: Session, name: str) -> PendingBundleRow:
    row = session.get(PendingBundleRow, name)
    if row is None:
        if session.get(BundleRow, name) is not None:
            raise FailedPrecondition(f"{name} is already published", field="name")
        raise NotFound(f"no pending publication {name}", field="name")
    return row


def find_pending(session: Session, name: str) -> PendingBundleRow | None:
    return session.get(PendingBundleRow, name)


def pending_by_request(session: Session, request_id: str) -> PendingBundleRow | None:
    query = select(PendingBundleRow).where(PendingBundleRow.request_id == request_id)
    return session.exec(query).first()


def update_pending_signatures(
    session: Session,
    name: str,
    *,
    revision: int,
    signed_targets: bytes,
    signer_keyids: Sequence[str],
    now: datetime,
) -> None:
    """Store more signatures, if nobody else changed the publication since `revision`."""
    result = session.execute(
        update(PendingBundleRow)
        .where(col(PendingBundleRow.name) == name, col(PendingBundleRow.revision) == revision)
        .values(
            signed_targets=signed_targets,
            signer_keyids_json=json.dumps(list(signer_keyids)),
            revision=revision + 1,
            updated_at=now,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Aborted(
            f"{name} changed while you signed it (another signature, a re-publication or a "
            "discard); run `ota bundle sign` again",
            field="name",
        )


def delete_pending(session: Session, name: str) -> None:
    row = session.get(PendingBundleRow, name)
    if row is not None:
        session.delete(row)


def list_pending(
    session: Session, feature: str, *, after: str, limit: int, stale_at: int | None = None
) -> list[PendingBundleRow]:
    """Pending publications by name; with `stale_at` (the current targets version), stale ones."""
    query = select(PendingBundleRow).where(col(PendingBundleRow.name) > after)
    if feature:
        query = query.where(PendingBundleRow.feature == feature)
    if stale_at is not None:
        query = query.where(col(PendingBundleRow.targets_version) <= stale_at)
    return list(session.exec(query.order_by(col(PendingBundleRow.name)).limit(limit)))


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

    def latest_versions(self) -> dict[str, int]:
        # Version numbers only, from the primary key's index: devices' reads of the
        # latest check this, and take the bytes from memory when they are known.
        with self._store.transaction() as session:
            query = select(TufMetadataRow.role, func.max(TufMetadataRow.version)).group_by(
                col(TufMetadataRow.role)
            )
            return {role: int(version) for role, version in session.exec(query).all()}

    def put_metadata(self, role: str, version: int, content: bytes) -> None:
        # An INSERT, never an upsert: a replica that raced to the same version must
        # fail (Aborted) rather than overwrite metadata devices may already hold.
        with self._store.transaction() as session:
            session.add(TufMetadataRow(role=role, version=version, content=content))
            if role == "root" and version > 1:
                # Root v1 is the bootstrap; every later one is a rotation, audited and
                # announced in the transaction that stores it.
                audit.record(
                    session,
                    "keys",
                    "root",
                    "rotate",
                    now=datetime.now(UTC),
                    reason=f"root v{version} stored",
                    detail={"root_version": version},
                )
                webhooks.enqueue(
                    session,
                    KEYS_ROTATED,
                    data={"root_version": version},
                    ordering_key=ordering_key(other="keys"),
                    now=datetime.now(UTC),
                )


def compatibility(bundle: BundleRow) -> Compatibility:
    """The models and firmware floor the bundle was signed for."""
    return Compatibility.of(json.loads(bundle.models_json), bundle.min_firmware)
