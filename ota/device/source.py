"""TUF metadata and bundle bytes over gRPC, for the device's trust client.

Every call carries a deadline. A `DownloadBundle` call gets a fixed allowance
plus the time the bytes it asks for take at a minimum rate, so a stream slower
than that rate on average (slow retrieval, a stall) is cut off by its deadline
and resumed by the caller from the last byte, under the device's retry policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from tuf.api.exceptions import DownloadHTTPError

from ota.device.retry import Unreachable
from ota.errors import InvalidArgument
from ota.v1 import bundle_pb2, bundle_pb2_grpc

# Answers a retry cannot change, as the HTTP status ngclient understands.
_PERMANENT = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}


# Answers that mean the control plane is not there (stopped, restarting, overloaded):
# the device waits for it rather than counting a failed attempt.
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class Deadlines:
    """Per-call deadlines, in seconds.

    `download_base` covers connecting and the first byte; on top of it a
    download call may take `remaining / download_min_rate` seconds for the
    `remaining` bytes it asks for.
    """

    metadata: float = 10.0
    download_base: float = 10.0
    download_min_rate: float = 64 * 1024  # bytes per second

    def __post_init__(self) -> None:
        for name in ("metadata", "download_base", "download_min_rate"):
            if not getattr(self, name) > 0:
                raise InvalidArgument("must be positive", field=name)

    def download(self, remaining: int) -> float:
        """The deadline of a call that asks for `remaining` bytes."""
        return self.download_base + max(remaining, 0) / self.download_min_rate


class GrpcSource:
    """One device's view of the control plane: its own credentials, a shared channel."""

    def __init__(
        self,
        channel: grpc.Channel,
        device_id: str,
        secret: str,
        *,
        deadlines: Deadlines | None = None,
    ) -> None:
        self._stub = bundle_pb2_grpc.BundleServiceStub(channel)
        # Without a secret the device is known by its client certificate (mutual TLS).
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer device:{device_id}:{secret}"),) if secret else ()
        )
        self._deadlines = deadlines or Deadlines()

    def fetch_metadata(self, role: str, version: int | None) -> bytes | None:
        try:
            response = self._stub.GetMetadata(
                bundle_pb2.GetMetadataRequest(role=role, version=version or 0),
                metadata=self._metadata,
                timeout=self._deadlines.metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            meaning = _translated(exc, answered=False)
            if meaning is exc:
                raise
            raise meaning from exc
        content: bytes = response.content
        return content

    def fetch_target(self, target_path: str, offset: int, max_length: int) -> Iterator[bytes]:
        stream = self._stub.DownloadBundle(
            bundle_pb2.DownloadBundleRequest(target_path=target_path, offset=offset),
            metadata=self._metadata,
            timeout=self._deadlines.download(max_length),
        )
        received = 0
        try:
            for response in stream:
                received += len(response.chunk)
                yield response.chunk
                if received > max_length:
                    return  # the caller sees the excess and refuses; finally ends the call
        except grpc.RpcError as exc:
            # Cut, reset, deadline: the caller resumes from the last byte.
            meaning = _translated(exc, answered=received > 0)
            if meaning is exc:
                raise
            raise meaning from exc
        finally:
            # Stopped early (excess, a refusal, a closed generator): end the call now
            # rather than leave the server streaming until the deadline.
            stream.cancel()  # type: ignore[no-untyped-call]

    def desired_state(self, device_id: str) -> bytes | None:
        try:
            envelope = self._stub.GetDesiredState(
                bundle_pb2.GetDesiredStateRequest(device_id=device_id),
                metadata=self._metadata,
                timeout=self._deadlines.metadata,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        out: bytes = envelope.SerializeToString()
        return out


def _translated(exc: grpc.RpcError, *, answered: bool) -> Exception:
    """What a failed call means to the device's retry policy (`ota.device.retry`).

    A refusal a retry cannot change becomes ngclient's HTTP error; a control plane
    that is not there (UNAVAILABLE: refused, reset, shutting down; or no answer at
    all before the deadline) `Unreachable`; anything else -- a stream that trickled
    past its deadline, say -- stays a broken transfer.
    """
    code = exc.code()
    status = _PERMANENT.get(code)
    if status is not None:
        return DownloadHTTPError(f"{code.name}: {exc.details()}", status)
    if code in _UNREACHABLE or (code == grpc.StatusCode.DEADLINE_EXCEEDED and not answered):
        return Unreachable(f"{code.name}: {exc.details()}")
    return exc
