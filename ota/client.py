"""A gRPC client of the control plane, shared by the CLI, the demo and the simulator."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import grpc

from ota.clock import SystemClock
from ota.errors import InvalidArgument
from ota.trust.keys import load_signer
from ota.trust.release import add_target, target_path_for
from ota.v1 import (
    bundle_pb2,
    bundle_pb2_grpc,
    fleet_pb2_grpc,
    report_pb2_grpc,
    rollout_pb2_grpc,
)

CHUNK = 256 * 1024


@dataclass
class Client:
    channel: grpc.Channel
    token: str

    @classmethod
    def connect(cls, server: str, token: str) -> Client:
        return cls(grpc.insecure_channel(server), token)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    @property
    def bundles(self) -> bundle_pb2_grpc.BundleServiceStub:
        return bundle_pb2_grpc.BundleServiceStub(self.channel)

    @property
    def rollouts(self) -> rollout_pb2_grpc.RolloutServiceStub:
        return rollout_pb2_grpc.RolloutServiceStub(self.channel)

    @property
    def fleet(self) -> fleet_pb2_grpc.FleetServiceStub:
        return fleet_pb2_grpc.FleetServiceStub(self.channel)

    @property
    def reports(self) -> report_pb2_grpc.ReportServiceStub:
        return report_pb2_grpc.ReportServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def publish_bundle(
        self,
        file: Path,
        *,
        feature: str,
        version: str,
        models: Sequence[str],
        min_firmware: str,
        keys: Sequence[Path],
        expires_in: timedelta = timedelta(days=365),
    ) -> bundle_pb2.Bundle:
        """Sign the file into the targets metadata with the release key(s), then upload both.

        The release keys never leave this process: only the signed metadata does.
        """
        if not keys:
            raise InvalidArgument("at least one release key (--key) is required", field="key")
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {file}: {exc.strerror}", field="file") from exc
        signers = [load_signer(k) for k in keys]
        current = self.bundles.GetMetadata(
            bundle_pb2.GetMetadataRequest(role="targets"), metadata=self.metadata
        ).content
        path = target_path_for(feature, version)
        signed = add_target(
            current,
            target_path=path,
            length=len(data),
            sha256_hex=hashlib.sha256(data).hexdigest(),
            custom={
                "feature": feature,
                "version": version,
                "models": list(models),
                **({"min_firmware": min_firmware} if min_firmware else {}),
            },
            signers=signers,
            expires=_now() + expires_in,
        )
        meta = bundle_pb2.PublishBundleMetadata(
            feature=feature,
            version=version,
            target_path=path,
            signed_targets=signed,
            request_id=str(uuid.uuid4()),
        )

        def parts() -> Iterator[bundle_pb2.PublishBundleRequest]:
            yield bundle_pb2.PublishBundleRequest(metadata=meta)
            for i in range(0, len(data), CHUNK):
                yield bundle_pb2.PublishBundleRequest(chunk=data[i : i + CHUNK])

        result: bundle_pb2.Bundle = self.bundles.PublishBundle(parts(), metadata=self.metadata)
        return result


def _now() -> datetime:
    return SystemClock().now()
