"""BundleService: publication by release engineers, and device reads.

A publication signed by the release threshold is committed at once. One signed
by fewer release keys is kept as a pending publication (its bytes in the blob
store, its targets metadata in `pending_bundle`) that devices cannot see; each
`SignBundle` adds signatures and the one that meets the threshold commits it.
A pending publication is built on one targets version: when another bundle is
committed first it goes stale and must be re-published (ABORTED until then).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator

import grpc
from securesystemslib.signer import Signature  # type: ignore[attr-defined, unused-ignore]
from sqlmodel import Session

from ota.api import convert
from ota.api.auth import require_device_self
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.domain.webhooks import (
    BUNDLE_DISCARDED,
    BUNDLE_PENDING_SIGNATURE,
    BUNDLE_PUBLISHED,
    ordering_key,
)
from ota.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ota.signing.release import parse_targets, signed_digest
from ota.store import audit, bundles, desired, webhooks
from ota.store.blobs import BlobStore, StoredBlob
from ota.store.models import BundleRow, PendingBundleRow
from ota.store.session import Store
from ota.trust.repository import AcceptedTarget, ImageRepository, Publication
from ota.v1 import bundle_pb2, bundle_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

ROLES = ("root", "timestamp", "snapshot", "targets")
MAX_BUNDLE_BYTES = 4 * 1024**3
MAX_SIGNATURES = 64
MAX_REQUEST_ID = 128  # the width of the stored request_id


class BundleServicer(bundle_pb2_grpc.BundleServiceServicer):
    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        repository: ImageRepository,
        clock: Clock,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._repo = repository
        self._clock = clock
        # One publication at a time per process: each one bumps the targets version.
        self._publishing = threading.Lock()

    # -- publication ----------------------------------------------------------------------

    def PublishBundle(
        self,
        request_iterator: Iterator[bundle_pb2.PublishBundleRequest],
        context: grpc.ServicerContext,
    ) -> bundle_pb2.Bundle:
        first = next(request_iterator, None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument("the first message must carry the metadata", field="metadata")
        meta = first.metadata
        for name in ("feature", "version", "target_path", "signed_targets"):
            if not getattr(meta, name):
                raise InvalidArgument("is required", field=f"metadata.{name}")
        name = bundles.bundle_name(meta.feature, meta.version)
        if meta.request_id:
            _check_request_id(meta.request_id, field="metadata.request_id")
            with self._store.transaction() as session:
                if earlier := bundles.bundle_by_request(session, meta.request_id):
                    _same_publication(earlier, meta)
                    return self._published(earlier)
                if waiting := bundles.pending_by_request(session, meta.request_id):
                    _same_publication(waiting, meta)
                    return self._pending(waiting)
        with self._publishing:
            with self._store.transaction() as session:
                if session.get(BundleRow, name) is not None:
                    raise AlreadyExists(f"{name} is already published", field="metadata.version")
                earlier_pending = bundles.find_pending(session, name)
            # Signatures, version and custom fields first: nothing is uploaded for a refusal.
            publication = self._repo.review_targets(
                meta.signed_targets, target_path=meta.target_path
            )
            target = publication.target
            if (target.custom.get("feature"), target.custom.get("version")) != (
                meta.feature,
                meta.version,
            ):
                raise InvalidArgument(
                    f"the signed target is {target.custom.get('feature')} "
                    f"{target.custom.get('version')}, not {meta.feature} {meta.version}",
                    field="metadata.signed_targets",
                )
            if earlier_pending is not None and not self._is_stale(earlier_pending):
                raise AlreadyExists(
                    f"{name} is already pending with "
                    f"{len(json.loads(earlier_pending.signer_keyids_json))} release signature(s); "
                    f"add yours with `ota bundle sign {name} --key KEY`, or "
                    f"`ota bundle discard {name}` before publishing it again",
                    field="metadata.version",
                )
            if meta.require_visible and not publication.complete:
                raise FailedPrecondition(
                    f"{_signed_by(publication)}; nothing was published because visibility was "
                    f"required. Sign with {publication.missing} more release key(s) (--key), or "
                    "publish without --require-visible and add them with `ota bundle sign`",
                    field="metadata.signed_targets",
                )
            chunks = (m.chunk for m in request_iterator if m.WhichOneof("part") == "chunk")
            self._receive(chunks, target)
            if publication.complete:
                # Devices see it only once snapshot and timestamp point at it.
                self._repo.commit_targets(meta.signed_targets)
            published: BundleRow | None = None
            kept: PendingBundleRow | None = None
            with self._store.transaction() as session:
                bundles.delete_pending(session, name)  # a stale one this re-bases
                session.flush()
                if publication.complete:
                    published = self._add_published(session, target, meta.request_id, "publish")
                else:
                    kept = bundles.add_pending(
                        session,
                        feature=meta.feature,
                        version=meta.version,
                        target_path=target.path,
                        sha256=target.sha256_hex,
                        length=target.length,
                        models=list(target.custom.get("models", [])),
                        min_firmware=str(target.custom.get("min_firmware", "")),
                        targets_version=publication.targets_version,
                        signed_targets=meta.signed_targets,
                        signer_keyids=target.signer_keyids,
                        request_id=meta.request_id,
                        now=self._clock.now(),
                    )
                    self._announce(session, BUNDLE_PENDING_SIGNATURE, kept, "publish")
            if earlier_pending is not None and earlier_pending.sha256 != target.sha256_hex:
                self._release_blob(earlier_pending.sha256)
            if published is not None:
                return self._published(published)
            assert kept is not None
            return self._pending(kept)

    def GetPendingTargets(
        self, request: bundle_pb2.GetPendingTargetsRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.PendingTargets:
        with self._store.transaction() as session:
            row = bundles.get_pending(session, request.name)
        md = parse_targets(row.signed_targets, field="signed_targets")
        return bundle_pb2.PendingTargets(
            bundle=self._pending(row),
            signed_targets=row.signed_targets,
            signed_sha256=bytes.fromhex(signed_digest(md)),
        )

    def SignBundle(
        self, request: bundle_pb2.SignBundleRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.Bundle:
        if not request.signatures:
            raise InvalidArgument("at least one signature is required", field="signatures")
        if len(request.signatures) > MAX_SIGNATURES:
            raise InvalidArgument(f"at most {MAX_SIGNATURES} signatures", field="signatures")
        for i, s in enumerate(request.signatures):
            if not s.keyid or not s.sig:
                raise InvalidArgument("needs a keyid and a sig", field=f"signatures[{i}]")
        signatures = [Signature(s.keyid, s.sig) for s in request.signatures]
        with self._publishing:
            with self._store.transaction() as session:
                row = bundles.get_pending(session, request.name)
            committed = self._repo.target(row.target_path)
            if committed is not None and committed.sha256_hex == row.sha256:
                # A commit whose bookkeeping was cut short (crash): finish it.
                return self._move_to_published(row, committed)
            if self._is_stale(row):
                raise _stale(row, self._repo.targets_version())
            md = parse_targets(row.signed_targets, field="signed_targets")
            if request.signed_sha256 and request.signed_sha256.hex() != signed_digest(md):
                raise _changed(row.name)
            data, publication = self._repo.add_signatures(
                row.signed_targets, signatures, target_path=row.target_path
            )
            if not publication.complete:
                with self._store.transaction() as session:
                    bundles.update_pending_signatures(
                        session,
                        row.name,
                        revision=row.revision,
                        signed_targets=data,
                        signer_keyids=publication.target.signer_keyids,
                        now=self._clock.now(),
                    )
                    row = bundles.get_pending(session, row.name)
                    self._announce(session, BUNDLE_PENDING_SIGNATURE, row, "sign")
                return self._pending(row)
            if not (self._blobs.root / row.sha256).is_file():
                raise FailedPrecondition(
                    f"the bytes of {row.name} are missing from the blob store; "
                    "discard it and publish it again",
                    field="name",
                )
            self._repo.commit_targets(data)
            return self._move_to_published(row, publication.target)

    def DiscardPendingBundle(
        self, request: bundle_pb2.DiscardPendingBundleRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.Bundle:
        with self._publishing:
            with self._store.transaction() as session:
                row = bundles.get_pending(session, request.name)
                bundles.delete_pending(session, row.name)
                self._announce(session, BUNDLE_DISCARDED, row, "discard")
            self._release_blob(row.sha256)
            return self._pending(row)

    def RotateRoot(
        self, request: bundle_pb2.RotateRootRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.RotateRootResponse:
        if not request.new_root:
            raise InvalidArgument("is required", field="new_root")
        with self._publishing:
            before = self._repo.targets_version()
            rotation = self._repo.rotate_root(
                request.new_root, resigned_targets=request.resigned_targets or None
            )
            if rotation.targets_version != before:
                signers = self._repo.release_signers()
                with self._store.transaction() as session:
                    bundles.set_signers(session, signers)
        return bundle_pb2.RotateRootResponse(
            root_version=rotation.root_version, targets_version=rotation.targets_version
        )

    # -- reads -------------------------------------------------------------------------------

    def GetBundle(
        self, request: bundle_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.Bundle:
        with self._store.transaction() as session:
            row = session.get(BundleRow, request.name)
            waiting = None if row is not None else bundles.find_pending(session, request.name)
        if row is not None:
            return self._published(row)
        if waiting is not None:
            return self._pending(waiting)
        raise NotFound(f"{request.name} does not exist", field="name")

    def ListBundles(
        self, request: bundle_pb2.ListBundlesRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.ListBundlesResponse:
        size = page_size(request.page_size)
        state = request.state
        scope = request.feature if not state else f"{request.feature}\x00{state}"
        after = page_after(request.page_token, scope=scope)
        published: list[BundleRow] = []
        waiting: list[PendingBundleRow] = []
        threshold, current = self._repo.release_threshold(), self._repo.targets_version()
        with self._store.transaction() as session:
            if state in (bundle_pb2.BUNDLE_STATE_UNSPECIFIED, bundle_pb2.BUNDLE_STATE_PUBLISHED):
                published = bundles.list_bundles(
                    session, request.feature, after=after, limit=size + 1
                )
            if state != bundle_pb2.BUNDLE_STATE_PUBLISHED:
                stale_at = current if state == bundle_pb2.BUNDLE_STATE_STALE else None
                waiting = bundles.list_pending(
                    session, request.feature, after=after, limit=size + 1, stale_at=stale_at
                )
        merged = [(r.name, self._published(r, threshold)) for r in published]
        merged += [(r.name, self._pending(r, threshold, current)) for r in waiting]
        merged.sort(key=lambda m: m[0])
        more = len(merged) > size
        merged = merged[:size]
        return bundle_pb2.ListBundlesResponse(
            bundles=[b for _, b in merged],
            next_page_token=page_token(merged[-1][0], scope=scope) if more else "",
        )

    def GetMetadata(
        self, request: bundle_pb2.GetMetadataRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.GetMetadataResponse:
        if request.role not in ROLES:
            raise InvalidArgument(f"must be one of {', '.join(ROLES)}", field="role")
        # Versions are stored as 32-bit integers on PostgreSQL: a larger one cannot exist.
        in_range = request.version < 2**31
        content = self._repo.metadata(request.role, request.version or None) if in_range else None
        if content is None:
            raise NotFound(f"no {request.role} metadata version {request.version}", field="version")
        return bundle_pb2.GetMetadataResponse(content=content)

    def GetDesiredState(
        self, request: bundle_pb2.GetDesiredStateRequest, context: grpc.ServicerContext
    ) -> common_pb2.Envelope:
        require_device_self(context, request.device_id)
        with self._store.transaction() as session:
            envelope = desired.get_envelope(session, request.device_id)
        if envelope is None:
            raise NotFound(f"no desired state for {request.device_id!r} yet", field="device_id")
        out = common_pb2.Envelope()
        out.ParseFromString(envelope)
        return out

    def DownloadBundle(
        self, request: bundle_pb2.DownloadBundleRequest, context: grpc.ServicerContext
    ) -> Iterator[bundle_pb2.DownloadBundleResponse]:
        # Published bundles only: a pending one's bytes stay out of reach.
        with self._store.transaction() as session:
            row = bundles.bundle_by_target(session, request.target_path)
        if row is None:
            raise NotFound(f"no bundle at {request.target_path!r}", field="target_path")
        if request.offset > row.length:
            raise InvalidArgument(f"offset is past the end ({row.length} bytes)", field="offset")
        for chunk in self._blobs.read(row.sha256, offset=request.offset):
            yield bundle_pb2.DownloadBundleResponse(chunk=chunk)

    # -- internals ---------------------------------------------------------------------------

    def _receive(self, chunks: Iterator[bytes], target: AcceptedTarget) -> StoredBlob:
        """Store the uploaded bytes if they are exactly what was signed; else keep nothing."""
        blob = self._blobs.write(chunks, max_length=target.length)
        if blob.length != target.length or blob.sha256_hex != target.sha256_hex:
            self._release_blob(blob.sha256_hex)
            raise InvalidArgument(
                f"the uploaded file ({blob.length} bytes, sha256 {blob.sha256_hex[:12]}) differs "
                f"from what was signed ({target.length} bytes, sha256 {target.sha256_hex[:12]}); "
                "nothing was published",
                field="chunk",
            )
        return blob

    def _release_blob(self, sha256: str) -> None:
        # Bytes are stored by digest: another bundle may share them.
        with self._store.transaction() as session:
            if bundles.sha256_in_use(session, sha256):
                return
        (self._blobs.root / sha256).unlink(missing_ok=True)

    def _add_published(
        self,
        session: Session,
        target: AcceptedTarget,
        request_id: str | None,
        action: str,
    ) -> BundleRow:
        row = bundles.add_bundle(
            session,
            feature=str(target.custom["feature"]),
            version=str(target.custom["version"]),
            target_path=target.path,
            sha256=target.sha256_hex,
            length=target.length,
            models=list(target.custom.get("models", [])),
            min_firmware=str(target.custom.get("min_firmware", "")),
            signer_keyids=list(target.signer_keyids),
            request_id=request_id,
            now=self._clock.now(),
        )
        self._announce(session, BUNDLE_PUBLISHED, row, action)
        return row

    def _announce(
        self,
        session: Session,
        event_type: str,
        row: BundleRow | PendingBundleRow,
        action: str,
    ) -> None:
        """Audit a bundle change and announce it to webhooks, in the transaction of the change."""
        signers = json.loads(row.signer_keyids_json)
        threshold = self._repo.release_threshold()
        audit.record(
            session,
            "bundle",
            row.name,
            action,
            now=self._clock.now(),
            reason=f"{_DONE[event_type]}: sha256 {row.sha256[:16]}…, "
            f"{len(signers)} of {threshold} release signature(s)",
            detail={"sha256": row.sha256, "length": row.length, "signer_keyids": signers},
        )
        webhooks.enqueue(
            session,
            event_type,
            data={
                "name": row.name,
                "feature": row.feature,
                "version": row.version,
                "target_path": row.target_path,
                "sha256": row.sha256,
                "length": row.length,
                "signer_keyids": signers,
                "signatures": len(signers),
                "signatures_required": self._repo.release_threshold(),
                "actor": audit.requester().actor,
            },
            ordering_key=ordering_key(bundle=row.name),
            now=self._clock.now(),
            feature=row.feature,
        )

    def _move_to_published(
        self, row: PendingBundleRow, target: AcceptedTarget
    ) -> bundle_pb2.Bundle:
        with self._store.transaction() as session:
            bundles.delete_pending(session, row.name)
            session.flush()  # the request id moves from one table to the other
            published = self._add_published(session, target, row.request_id, "sign")
        return self._published(published)

    def _is_stale(self, row: PendingBundleRow) -> bool:
        return self._repo.targets_version() >= row.targets_version

    def _published(self, row: BundleRow, threshold: int | None = None) -> bundle_pb2.Bundle:
        out = convert.bundle(row)
        out.state = bundle_pb2.BUNDLE_STATE_PUBLISHED
        out.signatures_required = threshold or self._repo.release_threshold()
        return out

    def _pending(
        self, row: PendingBundleRow, threshold: int | None = None, current: int | None = None
    ) -> bundle_pb2.Bundle:
        current = self._repo.targets_version() if current is None else current
        return bundle_pb2.Bundle(
            name=row.name,
            feature=row.feature,
            version=row.version,
            target_path=row.target_path,
            sha256=bytes.fromhex(row.sha256),
            length=row.length,
            models=json.loads(row.models_json),
            min_firmware=row.min_firmware,
            signer_keyids=json.loads(row.signer_keyids_json),
            create_time=convert.ts(row.created_at),
            state=bundle_pb2.BUNDLE_STATE_STALE
            if current >= row.targets_version
            else bundle_pb2.BUNDLE_STATE_PENDING,
            signatures_required=threshold or self._repo.release_threshold(),
            targets_version=row.targets_version,
        )


_DONE = {
    BUNDLE_PUBLISHED: "published",
    BUNDLE_PENDING_SIGNATURE: "signed, pending more signatures",
    BUNDLE_DISCARDED: "discarded",
}


def _check_request_id(request_id: str, *, field: str) -> None:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument(
            f"must be at most {MAX_REQUEST_ID} printable characters (a UUID, say)", field=field
        )


def _same_publication(
    earlier: BundleRow | PendingBundleRow, meta: bundle_pb2.PublishBundleMetadata
) -> None:
    """A retry carries the same request_id and body; another body is a caller's mistake."""
    if (earlier.feature, earlier.version, earlier.target_path) == (
        meta.feature,
        meta.version,
        meta.target_path,
    ) and _claimed_sha256(meta.signed_targets, meta.target_path) == earlier.sha256:
        return
    raise InvalidArgument(
        f"{meta.request_id!r} was used to publish {earlier.name} with other contents; "
        "use a new request_id for a new publication",
        field="metadata.request_id",
    )


def _claimed_sha256(signed_targets: bytes, target_path: str) -> str:
    """The sha256 the signed targets give `target_path` (only compared, never trusted)."""
    try:
        md = parse_targets(signed_targets, field="metadata.signed_targets")
        return str(md.signed.targets[target_path].hashes["sha256"])
    except (InvalidArgument, KeyError):
        return ""


def _signed_by(publication: Publication) -> str:
    return (
        f"targets is signed by {len(publication.target.signer_keyids)} of the "
        f"{publication.threshold} release keys required"
    )


def _stale(row: PendingBundleRow, current: int) -> Aborted:
    return Aborted(
        f"{row.name} was signed over targets v{row.targets_version - 1}, but another publication "
        f"made targets v{current} since: its signatures can never count. Re-publish it "
        f"(`ota bundle publish`, which replaces the stale one) and collect the signatures again",
        field="name",
    )


def _changed(name: str) -> Aborted:
    return Aborted(
        f"{name} changed since you fetched it (re-published or signed by someone else); "
        "run `ota bundle sign` again to review the current one",
        field="signed_sha256",
    )
