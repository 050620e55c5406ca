"""BundleService: publication by release engineers, and device reads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from ota.api import convert
from ota.api.auth import require_device_self
from ota.api.paging import page_after, page_size, page_token
from ota.clock import Clock
from ota.errors import AlreadyExists, InvalidArgument, NotFound
from ota.store import bundles, desired
from ota.store.blobs import BlobStore
from ota.store.models import BundleRow
from ota.store.session import Store
from ota.trust.repository import ImageRepository
from ota.v1 import bundle_pb2, bundle_pb2_grpc, common_pb2

ROLES = ("root", "timestamp", "snapshot", "targets")
MAX_BUNDLE_BYTES = 4 * 1024**3


class BundleServicer(bundle_pb2_grpc.BundleServiceServicer):
    def __init__(
        self, store: Store, blobs: BlobStore, repository: ImageRepository, clock: Clock
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._repo = repository
        self._clock = clock
        # One publication at a time per process: each one bumps the targets version.
        self._publishing = threading.Lock()

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
        with self._store.transaction() as session:
            if meta.request_id and (earlier := bundles.bundle_by_request(session, meta.request_id)):
                return convert.bundle(earlier)
            name = bundles.bundle_name(meta.feature, meta.version)
            if session.get(BundleRow, name) is not None:
                raise AlreadyExists(f"{name} is already published", field="metadata.version")
        with self._publishing:
            accepted = self._repo.accept_targets(meta.signed_targets, target_path=meta.target_path)
            custom: dict[str, Any] = accepted.custom
            if custom.get("feature") != meta.feature or custom.get("version") != meta.version:
                raise InvalidArgument(
                    f"the signed target is {custom.get('feature')} {custom.get('version')}, "
                    f"not {meta.feature} {meta.version}",
                    field="metadata.signed_targets",
                )
            chunks = (m.chunk for m in request_iterator if m.WhichOneof("part") == "chunk")
            blob = self._blobs.write(chunks, max_length=accepted.length)
            if blob.length != accepted.length or blob.sha256_hex != accepted.sha256_hex:
                blob.path.unlink(missing_ok=True)
                raise InvalidArgument(
                    f"the uploaded file ({blob.length} bytes, sha256 {blob.sha256_hex[:12]}) differs "
                    f"from what was signed ({accepted.length} bytes, sha256 {accepted.sha256_hex[:12]})",
                    field="chunk",
                )
            # Devices see it only once snapshot and timestamp point at it.
            self._repo.commit_targets(meta.signed_targets)
            with self._store.transaction() as session:
                row = bundles.add_bundle(
                    session,
                    feature=meta.feature,
                    version=meta.version,
                    target_path=accepted.path,
                    sha256=accepted.sha256_hex,
                    length=accepted.length,
                    models=list(custom.get("models", [])),
                    min_firmware=str(custom.get("min_firmware", "")),
                    signer_keyids=list(accepted.signer_keyids),
                    request_id=meta.request_id,
                    now=self._clock.now(),
                )
            return convert.bundle(row)

    def GetBundle(
        self, request: bundle_pb2.GetBundleRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.Bundle:
        with self._store.transaction() as session:
            return convert.bundle(bundles.get_bundle(session, request.name))

    def ListBundles(
        self, request: bundle_pb2.ListBundlesRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.ListBundlesResponse:
        size = page_size(request.page_size)
        after = page_after(request.page_token, scope=request.feature)
        with self._store.transaction() as session:
            rows = bundles.list_bundles(session, request.feature, after=after, limit=size + 1)
        more = len(rows) > size
        rows = rows[:size]
        return bundle_pb2.ListBundlesResponse(
            bundles=[convert.bundle(r) for r in rows],
            next_page_token=page_token(rows[-1].name, scope=request.feature) if more else "",
        )

    def GetMetadata(
        self, request: bundle_pb2.GetMetadataRequest, context: grpc.ServicerContext
    ) -> bundle_pb2.GetMetadataResponse:
        if request.role not in ROLES:
            raise InvalidArgument(f"must be one of {', '.join(ROLES)}", field="role")
        content = self._repo.metadata(request.role, request.version or None)
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
        with self._store.transaction() as session:
            row = bundles.bundle_by_target(session, request.target_path)
        if row is None:
            raise NotFound(f"no bundle at {request.target_path!r}", field="target_path")
        if request.offset > row.length:
            raise InvalidArgument(f"offset is past the end ({row.length} bytes)", field="offset")
        for chunk in self._blobs.read(row.sha256, offset=request.offset):
            yield bundle_pb2.DownloadBundleResponse(chunk=chunk)
