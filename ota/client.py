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
from ota.signing.keys import load_signer
from ota.signing.release import (
    PendingReview,
    TargetClaim,
    add_target,
    check_file,
    resign_targets,
    review_pending,
    sign_pending,
    target_path_for,
)
from ota.signing.rootgen import RootChange, next_root, verify_root_chain
from ota.tls import ClientTls
from ota.tls import channel as tls_channel
from ota.v1 import (
    audit_pb2_grpc,
    bundle_pb2,
    bundle_pb2_grpc,
    fleet_pb2_grpc,
    report_pb2_grpc,
    rollout_pb2_grpc,
    token_pb2_grpc,
    webhook_pb2_grpc,
)

CHUNK = 256 * 1024
# URL schemes people write for a gRPC server that gRPC itself does not take
# (its own target schemes, dns:, unix:, ipv4:, ipv6:, pass through).
_URL_SCHEMES = {"http": "", "https": " --tls", "grpc": "", "grpcs": " --tls"}


def check_server(server: str) -> str:
    """The gRPC target `server`, or one line saying how to write it.

    `http://host:50051` would reach gRPC's resolver as a host name and fail with
    "Misformatted domain name"; refusing it here names the fix instead. It is not
    stripped silently: `https://` would then quietly mean plaintext.
    """
    server = server.strip().rstrip("/")
    if not server:
        raise InvalidArgument("is empty: give host:port, e.g. 127.0.0.1:50051", field="server")
    scheme, sep, rest = server.partition("://")
    if sep and scheme.lower() in _URL_SCHEMES:
        bare = rest.rstrip("/")
        raise InvalidArgument(
            f"{server!r} has a URL scheme; gRPC takes host:port: drop the scheme "
            f"(--server {bare}{_URL_SCHEMES[scheme.lower()]})",
            field="server",
        )
    return server


@dataclass(frozen=True)
class PendingSigning:
    """A pending publication as fetched, and what the local review found in it."""

    pending: bundle_pb2.PendingTargets
    review: PendingReview


@dataclass(frozen=True)
class RootRotationPlan:
    """Root N+1 (and re-signed targets) built locally, ready to upload."""

    current_root: bytes
    new_root: bytes
    resigned_targets: bytes | None


@dataclass
class Client:
    channel: grpc.Channel
    token: str

    @classmethod
    def connect(cls, server: str, token: str, tls: ClientTls | None = None) -> Client:
        """A client over plaintext, or over TLS (and mTLS with a client certificate)."""
        return cls(tls_channel(check_server(server), tls), token)

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

    @property
    def tokens(self) -> token_pb2_grpc.TokenServiceStub:
        return token_pb2_grpc.TokenServiceStub(self.channel)

    @property
    def audit(self) -> audit_pb2_grpc.AuditServiceStub:
        return audit_pb2_grpc.AuditServiceStub(self.channel)

    @property
    def webhooks(self) -> webhook_pb2_grpc.WebhookServiceStub:
        return webhook_pb2_grpc.WebhookServiceStub(self.channel)

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
        require_visible: bool = False,
    ) -> bundle_pb2.Bundle:
        """Sign the file into the targets metadata with the release key(s), then upload both.

        The release keys never leave this process: only the signed metadata does.
        Short of the release threshold the bundle comes back PENDING (invisible to
        devices) unless `require_visible`, which makes the server refuse it instead.
        """
        if not keys:
            raise InvalidArgument("at least one release key (--key) is required", field="key")
        data = _read(file)
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
            require_visible=require_visible,
        )

        def parts() -> Iterator[bundle_pb2.PublishBundleRequest]:
            yield bundle_pb2.PublishBundleRequest(metadata=meta)
            for i in range(0, len(data), CHUNK):
                yield bundle_pb2.PublishBundleRequest(chunk=data[i : i + CHUNK])

        result: bundle_pb2.Bundle = self.bundles.PublishBundle(parts(), metadata=self.metadata)
        return result

    def review_pending(
        self, name: str, *, file: Path | None = None, trusted_root: bytes | None = None
    ) -> PendingSigning:
        """Fetch a pending publication and check it adds exactly the bundle it claims.

        With `file`, also check the local copy is byte for byte the signed bundle;
        with `trusted_root`, trust the server's root only through a verified chain.
        """
        pending = self.bundles.GetPendingTargets(
            bundle_pb2.GetPendingTargetsRequest(name=name), metadata=self.metadata
        )
        b = pending.bundle
        claim = TargetClaim(
            target_path=b.target_path,
            length=b.length,
            sha256_hex=b.sha256.hex(),
            custom={
                "feature": b.feature,
                "version": b.version,
                "models": list(b.models),
                **({"min_firmware": b.min_firmware} if b.min_firmware else {}),
            },
        )
        review = review_pending(
            pending.signed_targets,
            current_targets=self.metadata_bytes("targets"),
            root=self.current_root(trusted_root),
            claimed=claim,
            now=_now(),
        )
        if review.signed_sha256 != pending.signed_sha256.hex():
            raise InvalidArgument(
                "the server's digest of the pending targets does not match them; do not sign",
                field="signed_sha256",
            )
        if file is not None:
            check_file(review.target, _read(file))
        return PendingSigning(pending, review)

    def sign_bundle(self, signing: PendingSigning, keys: Sequence[Path]) -> bundle_pb2.Bundle:
        """Sign the reviewed pending targets locally and upload only the signatures."""
        if not keys:
            raise InvalidArgument("at least one release key (--key) is required", field="key")
        signatures = sign_pending(signing.pending.signed_targets, [load_signer(k) for k in keys])
        result: bundle_pb2.Bundle = self.bundles.SignBundle(
            bundle_pb2.SignBundleRequest(
                name=signing.pending.bundle.name,
                signatures=[
                    bundle_pb2.TargetsSignature(keyid=s.keyid, sig=s.signature) for s in signatures
                ],
                signed_sha256=signing.pending.signed_sha256,
            ),
            metadata=self.metadata,
        )
        return result

    def metadata_bytes(self, role: str, version: int = 0) -> bytes:
        """TUF metadata as the server serves it to devices (0: the newest version)."""
        content: bytes = self.bundles.GetMetadata(
            bundle_pb2.GetMetadataRequest(role=role, version=version), metadata=self.metadata
        ).content
        return content

    def current_root(self, trusted_root: bytes | None = None) -> bytes:
        """The server's newest root; with `trusted_root`, only through a verified chain."""
        if trusted_root is None:
            return self.metadata_bytes("root")
        chain: list[bytes] = []
        version = verify_root_chain(trusted_root, []).signed.version
        while True:
            version += 1
            try:
                chain.append(self.metadata_bytes("root", version))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                break
        verify_root_chain(trusted_root, chain)
        return chain[-1] if chain else trusted_root

    def plan_root_rotation(
        self,
        change: RootChange,
        *,
        root_keys: Sequence[Path],
        release_keys: Sequence[Path] = (),
        expires_in: timedelta = timedelta(days=365),
        trusted_root: bytes | None = None,
    ) -> RootRotationPlan:
        """Build root N+1 here, signed by `root_keys` (current and new root keys).

        With `release_keys`, the current targets are re-signed by them as the next
        version (the same bundles), as a change of release keys requires.
        """
        current = self.current_root(trusted_root)
        expires = _now() + expires_in
        new_root = next_root(current, change, [load_signer(k) for k in root_keys], expires=expires)
        resigned = None
        if release_keys:
            resigned = resign_targets(
                self.metadata_bytes("targets"),
                [load_signer(k) for k in release_keys],
                expires=expires,
            )
        elif change.release_keys is not None:
            raise InvalidArgument(
                "new release keys must re-sign the current targets: pass their private "
                "keys with --release-key (at least the new release threshold)",
                field="release_key",
            )
        return RootRotationPlan(current, new_root, resigned)

    def rotate_root(self, plan: RootRotationPlan) -> bundle_pb2.RotateRootResponse:
        """Upload root N+1 (and re-signed targets); the server checks both thresholds."""
        result: bundle_pb2.RotateRootResponse = self.bundles.RotateRoot(
            bundle_pb2.RotateRootRequest(
                new_root=plan.new_root, resigned_targets=plan.resigned_targets or b""
            ),
            metadata=self.metadata,
        )
        return result


def _now() -> datetime:
    return SystemClock().now()


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {file}: {exc.strerror}", field="file") from exc
