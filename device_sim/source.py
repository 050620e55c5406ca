"""TUF metadata and bundle bytes over gRPC, for the device's trust client."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from ota.v1 import bundle_pb2, bundle_pb2_grpc

METADATA_DEADLINE = 10.0
DOWNLOAD_DEADLINE = 120.0


class GrpcSource:
    """One device's view of the control plane: its own credentials, a shared channel."""

    def __init__(self, channel: grpc.Channel, device_id: str, secret: str) -> None:
        self._stub = bundle_pb2_grpc.BundleServiceStub(channel)
        self._metadata = (("authorization", f"Bearer device:{device_id}:{secret}"),)

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        try:
            response = self._stub.GetMetadata(
                bundle_pb2.GetMetadataRequest(role=role, version=version or 0),
                metadata=self._metadata,
                timeout=METADATA_DEADLINE,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        content: bytes = response.content
        return content

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        received = 0
        stream = self._stub.DownloadBundle(
            bundle_pb2.DownloadBundleRequest(target_path=target_path, offset=offset),
            metadata=self._metadata,
            timeout=DOWNLOAD_DEADLINE,
        )
        for response in stream:
            received += len(response.chunk)
            if received > max_length:
                stream.cancel()  # type: ignore[no-untyped-call]
                yield response.chunk  # the caller sees the excess and refuses
                return
            yield response.chunk

    def desired_state(self, device_id: str) -> bytes | None:
        try:
            envelope = self._stub.GetDesiredState(
                bundle_pb2.GetDesiredStateRequest(device_id=device_id),
                metadata=self._metadata,
                timeout=METADATA_DEADLINE,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        out: bytes = envelope.SerializeToString()
        return out
