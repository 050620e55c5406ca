"""The agent: follows one device's desired state and hands verified bundles to the hooks.

One worker thread (the caller of `Agent.run`) does everything in order: what
the broker delivers, the pull on connect and the health ticks wait in a
queue. Every step is written to disk (atomically) before the next begins, so
a power cut anywhere leaves a state the agent resumes from when it boots:

- the desired state is verified (`DeviceTrust`) and its generation kept
  before anything is done about it;
- a bundle is downloaded, verified against TUF and kept before INSTALLING;
- the `install` hook's success is recorded before `activate` runs, and
  `activate`'s before ACTIVE is reported and the order settled.

A certificate device (`identity = "certificate"`) renews its certificate
over its mutual-TLS channel once two thirds of its lifetime have passed,
checked at start and every hour; the agent then starts over with the new one
(`run` returns True), which reconnects everything with it.

A hook whose success was not recorded yet when the power went runs again on
the next boot: that is why hooks must be idempotent (README, "Device team").
A hook that fails, hangs, floods or is missing fails the step with
INSTALL_FAILED and its output in the detail; the agent itself carries on.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import urllib3
from google.protobuf.timestamp_pb2 import Timestamp

from ota.agent import identity as agent_identity
from ota.agent.config import AgentConfig, TlsFiles
from ota.agent.hooks import DETAIL_CHARS, HookCall, HookResult, Hooks
from ota.agent.link import BrokerLink
from ota.clock import Clock, SystemClock
from ota.device.enroll import Identity, renew
from ota.device.events import EventSequence
from ota.device.http_source import HttpSource
from ota.device.retry import RetryPolicy
from ota.device.source import Deadlines, GrpcSource
from ota.device.state import STATE_FILE, InstalledBundle, InstalledFeatures, reached_at_least
from ota.device.trust import DeviceTrust, MetadataSource, StaleDesiredState, check_not_downgrade
from ota.domain.progress import is_waiting
from ota.domain.states import SETTLED
from ota.errors import InvalidArgument, OtaError, VerificationError
from ota.tls import ClientTls, channel
from ota.transport.topics import Topics
from ota.v1 import common_pb2

log = logging.getLogger(__name__)

# Refusals a retry cannot change: the same signed inputs give the same answer.
FINAL_REASONS = frozenset({"ROLLBACK_REFUSED", "INCOMPATIBLE"})
SEQ_FILE = "event-seq"
# How often a running agent looks whether its certificate is due for renewal.
RENEW_CHECK_SECONDS = 3600.0


class _Stopping(BaseException):
    """SIGTERM: stop between two steps (each step is on disk, so this is a safe point).

    A BaseException, so that no ``except Exception`` on the way (python-tuf's,
    the retry loop's) turns a stop during a download into a failed download.
    """


@dataclass(frozen=True)
class _Work:
    kind: str  # "connected", "desired", "health", "renew"
    payload: bytes = b""


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Clock | None = None,
        identity: Identity | None = None,
    ) -> None:
        """`identity`: the certificate of a certificate device (`identity.load_or_enroll`)."""
        self._stop = False  # set from a signal handler: a plain flag, no locks
        self._restart = False  # a renewed certificate: start over with it
        if config.certificate and identity is None:
            raise InvalidArgument("a certificate device needs its certificate", field="identity")
        self.identity = identity
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.device_id = config.device_id
        self.topics = Topics(config.topic_root)
        try:
            root = config.trusted_root.read_bytes()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read {config.trusted_root}: {exc.strerror}", field="trusted_root"
            ) from exc
        state_dir = config.state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgument(
                f"cannot create {state_dir}: {exc.strerror}", field="state_dir"
            ) from exc
        tls = config.grpc_tls
        mqtt_tls = config.mqtt_tls
        if identity is not None:
            # Everything over mutual TLS with the enrolled certificate: the device port,
            # the broker's certificate listener, the delivery origin.
            assert tls is not None and mqtt_tls is not None
            cert, key = config.identity_dir / "cert.pem", config.identity_dir / "key.pem"
            self._channel = channel(config.device_server, ClientTls(tls.ca_file, cert, key))
            mqtt_tls = TlsFiles(mqtt_tls.ca_file, cert, key)
            # Named in the first log line: the address it calls, not the one it enrolled on.
            self._calls = f"device port {config.device_server}"
        else:
            self._calls = f"server {config.server}"
            self._channel = channel(
                config.server,
                ClientTls(tls.ca_file, tls.cert_file, tls.key_file) if tls is not None else None,
            )
        self._source = GrpcSource(self._channel, config.device_id, config.secret)
        self._http: urllib3.PoolManager | None = None
        delivery: MetadataSource = self._source
        if config.origin_url:
            if identity is not None:
                self._http = identity.http_pool(config.origin_ca_file, config.identity_dir)
            else:
                ca = config.origin_ca_file
                self._http = urllib3.PoolManager(maxsize=2, ca_certs=str(ca) if ca else None)
            delivery = HttpSource(
                config.origin_url, deadlines=Deadlines(), pool=self._http, token=config.origin_token
            )
        self.trust = DeviceTrust(
            device_id=config.device_id,
            model=config.model,
            firmware=config.firmware,
            state_dir=state_dir,
            trusted_root=root,
            source=delivery,
            clock=self.clock,
            # A device has time: ride out a control plane that is away for minutes. The
            # pauses end early on SIGTERM.
            retry=RetryPolicy(
                attempts=config.download_attempts,
                first_delay=1.0,
                max_delay=60.0,
                sleep=self._pause,
            ),
        )
        self.features = InstalledFeatures.load(state_dir / STATE_FILE)
        self.sequence = EventSequence(state_dir / SEQ_FILE)
        self.hooks = Hooks(
            config.hooks,
            {
                "OTA_DEVICE_ID": config.device_id,
                "OTA_MODEL": config.model,
                "OTA_REGION": config.region,
                "OTA_FIRMWARE": config.firmware,
                "OTA_STATE_DIR": str(state_dir),
            },
        )
        # Files of work cut short by the last power loss (partial downloads) go now.
        for leftover in self.features.prune(self.trust.downloads):
            log.info("removed %s, left over from before the last start", leftover.name)
        host, port = config.broker_host_port
        self._link = BrokerLink(
            host=host,
            port=port,
            device_id=config.device_id,
            secret=config.secret,
            tls=mqtt_tls,
            desired_topic=self.topics.desired(config.device_id),
            will=(self.topics.state(config.device_id), self._reported(online=False)),
            on_connected=lambda: self._queue.put(_Work("connected")),
            on_desired=lambda payload: self._queue.put(_Work("desired", payload)),
        )
        self._queue: queue.Queue[_Work] = queue.Queue()
        self._health_pending = threading.Event()
        self._boot = self._started = time.monotonic()
        # Generations a session may see late: the retained copy of a state older than
        # the one its pull on connect fetched.
        self._late = range(0)

    # -- running -------------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        """A retry's pause, cut short by a stop request."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._check_stop()
            time.sleep(min(left, 0.5))
        self._check_stop()

    def request_stop(self) -> None:
        """Stop after the step in progress (safe to call from a signal handler)."""
        self._stop = True

    def run(self) -> bool:
        """Follow the desired state until `request_stop`; returns after a clean stop.

        True: the certificate was renewed, and the caller should start a new
        agent with it (the connections of this one hold the old one).
        """
        log.info(
            "ota-agent for %s (%s, firmware %s): %s, broker %s, state in %s",
            self.device_id,
            self.config.model,
            self.config.firmware,
            self._calls,
            self.config.broker,
            self.config.state_dir,
        )
        if self.identity is not None:
            self._queue.put(_Work("renew"))  # first: a device back after months renews now
        self._link.start()
        ticker = threading.Thread(target=self._tick, name="health-ticker", daemon=True)
        ticker.start()
        try:
            while not self._stop:
                try:
                    work = self._queue.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    self._handle(work)
                except _Stopping:
                    break
                except (OtaError, grpc.RpcError, OSError) as exc:
                    # Trouble with the network or the disk: the work stays on disk and is
                    # resumed on the next connect; the agent stays up.
                    log.error("could not finish %s: %s", work.kind, exc)
                except Exception:
                    # A bug of ours: say so loudly, drop this piece of work, carry on. A
                    # restart would only meet the same input again.
                    log.exception("unexpected error handling %s", work.kind)
        finally:
            if self._restart:
                # Back at once with the new certificate: no "offline" in between.
                log.info("reconnecting with the renewed certificate")
                self._link.stop(None)
            else:
                log.info("stopping: saying offline to the broker")
                self._link.stop((self.topics.state(self.device_id), self._reported(online=False)))
            self._channel.close()
            if self._http is not None:
                self._http.clear()
        if not self._restart:
            log.info("stopped cleanly")
        return self._restart

    def _tick(self) -> None:
        interval = self.config.health_interval_seconds
        renew_checked = time.monotonic()
        while not self._stop:
            time.sleep(1.0 if interval <= 0 else min(interval, 1.0))
            if self.identity is not None and time.monotonic() - renew_checked >= (
                RENEW_CHECK_SECONDS
            ):
                renew_checked = time.monotonic()
                self._queue.put(_Work("renew"))
            if interval <= 0:
                continue
            if time.monotonic() - self._started < interval:
                continue
            self._started = time.monotonic()
            if not self._health_pending.is_set():  # one pending tick is enough
                self._health_pending.set()
                self._queue.put(_Work("health"))

    def _handle(self, work: _Work) -> None:
        if work.kind == "connected":
            self._on_connected()
        elif work.kind == "desired":
            self._on_desired(work.payload)
        elif work.kind == "health":
            self._health_pending.clear()
            self._sample_health()
        elif work.kind == "renew":
            self._renew_if_due()

    def _renew_if_due(self) -> None:
        """Renew the certificate once it is two thirds through its life (ota.device.enroll).

        From the moment the control plane records the new certificate the old
        one is refused, so the new one is on disk before anything else; then the
        agent starts over with it. A failure is logged and retried at the next
        check; an answer lost on the way leaves a refused key (a new enrollment
        token then), which DECISIONS.md accepts over keeping two keys valid.
        """
        identity = self.identity
        if identity is None or not identity.due(self.clock.now()):
            return
        log.info("certificate %s is due for renewal; renewing", identity.serial)
        renewed = renew(self._channel, self.device_id)
        agent_identity.save(self.config, renewed)
        log.info("renewed: certificate %s, next renewal %s", renewed.serial, renewed.renew_at())
        self.identity = renewed
        self._restart = self._stop = True  # the ticker stops too
        raise _Stopping()

    def _check_stop(self) -> None:
        if self._stop:
            raise _Stopping()

    def _on_connected(self) -> None:
        """Every (re)connect: finish the work left over, then pull the desired state."""
        self._publish_state()
        state = self.trust.accepted_state()
        if state is not None:
            for assignment in state.features:
                self._apply(assignment)
            self._publish_state()
        try:
            pulled = self._source.desired_state(self.device_id)
        except grpc.RpcError as exc:
            log.warning("could not pull the desired state: %s", exc.code().name)
            pulled = None
        if pulled:
            before = self.trust.accepted_generation
            self._on_desired(pulled)
            self._late = range(before, self.trust.accepted_generation)
        log.info("following desired state generation %d", self.trust.accepted_generation)

    def _on_desired(self, envelope: bytes) -> None:
        try:
            state = self.trust.verify_desired_state(envelope)
        except StaleDesiredState as stale:
            if stale.generation != stale.accepted and stale.generation not in self._late:
                self._refuse_unverified(envelope, stale)  # genuine but replayed
            return
        except VerificationError as exc:
            self._refuse_unverified(envelope, exc)
            return
        log.info("accepted desired state generation %d", state.generation)
        for assignment in state.features:
            self._apply(assignment)
        self._publish_state()

    # -- one feature -----------------------------------------------------------------------

    def _apply(self, a: common_pb2.FeatureAssignment) -> None:
        if self.features.is_settled(a):
            return
        flight = self.features.in_flight(a.feature)
        if flight is not None and not flight.is_for(a):
            self.features.abandon(a.feature)
        current = self.features.installed.get(a.feature)
        if a.revert:
            self._revert(a, current)
        elif not a.active:
            self._deactivate(a, current)
        elif current is not None and current.sha256 == a.sha256:
            self._finish_install(a, current)
        else:
            self._install(a, current)

    def _install(self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None) -> None:
        reached = self.features.reached(a)
        if reached is None:
            self._report(a, "NOTIFIED")
            if current is not None:
                try:
                    check_not_downgrade(a, current.version)
                except VerificationError as exc:
                    self._fail(a, exc.reason, str(exc))
                    return
            self._report(a, "DOWNLOADING")
        path = self._fetch(a)
        if path is None:
            return
        if not reached_at_least(reached, "VERIFIED"):
            self._report(a, "DOWNLOADED")
            self._report(a, "VERIFIED")
            self.features.mark(a, "VERIFIED", file=path)
            self.features.save()
        if not reached_at_least(reached, "INSTALLING"):
            self._report(a, "INSTALLING")
            self.features.mark(a, "INSTALLING", file=path)
            self.features.save()
        self._check_stop()
        previous = current.version if current is not None and current.active else ""
        result = self.hooks.run("install", self._call(a, path, previous))
        if not result.ok:
            self._fail(a, "INSTALL_FAILED", result.detail)
            return
        installed = self.features.install(a, path)
        self.features.save()
        self._finish_install(a, installed)

    def _fetch(self, a: common_pb2.FeatureAssignment) -> Path | None:
        """Download and verify `a`'s bundle; None once a failure was reported.

        A control plane out of reach for the retry policy's whole window is said
        once (CONTROL_PLANE_UNREACHABLE: a wait, not a failure; the work stays in
        flight) and then waited for again, until it answers or the agent stops.
        """
        said = False
        while True:
            try:
                # After a power cut this finds the kept file and re-verifies it against TUF.
                return self.trust.fetch_bundle(a)
            except VerificationError as exc:
                if not is_waiting(exc.reason):
                    self._fail(a, exc.reason, str(exc))
                    return None
                if not said:
                    log.warning("%s %s: %s; still trying", a.feature, a.version, exc)
                    self._report(a, "FAILED", reason=exc.reason, detail=str(exc))
                    said = True

    def _finish_install(self, a: common_pb2.FeatureAssignment, current: InstalledBundle) -> None:
        """`a`'s bundle is installed: activate it, and say so once for `a`'s rollout."""
        self._check_stop()
        reached = self.features.reached(a)
        if not current.intact():
            self._fail(a, "INSTALL_FAILED", "the kept bundle is damaged; not activated")
            return
        good = self.features.last_known_good.get(a.feature)
        result = self.hooks.run(
            "activate", self._call(a, current.file, good.version if good else "")
        )
        if not result.ok:
            self._undo_activation(a, current)
            self._fail(a, "INSTALL_FAILED", result.detail)
            return
        if not current.active:
            self.features.set_active(a.feature, True)
        if reached is not None and not reached_at_least(reached, "INSTALLED"):
            self._report(a, "INSTALLED")
        self._report(a, "ACTIVE", health=self._health(a.feature, a.version, current)[0])
        self.features.settle(a)
        self.features.save()

    def _undo_activation(self, a: common_pb2.FeatureAssignment, current: InstalledBundle) -> None:
        """`activate` failed: put back what ran before (`rollback`), or leave it off."""
        good = self.features.last_known_good.get(a.feature)
        if good is not None and good.sha256 != current.sha256:
            back = self.hooks.run(
                "rollback",
                HookCall(a.feature, good.version, good.file, good.sha256.hex(), current.version),
            )
            if back.ok:
                self.features.revert_to_last_known_good(a.feature)
                self.features.save()
                return
        if current.active:
            self.features.set_active(a.feature, False)
            self.features.save()

    def _deactivate(self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None) -> None:
        if current is None or not current.active:
            return
        self._check_stop()
        result = self.hooks.run(
            "deactivate",
            HookCall(
                a.feature, current.version, current.file, current.sha256.hex(), "", a.rollout_id
            ),
        )
        if not result.ok:
            self._fail(a, "INSTALL_FAILED", result.detail)
            return
        self.features.set_active(a.feature, False)
        self.features.settle(a)
        self.features.save()
        self._report(a, "DEACTIVATED")

    def _revert(self, a: common_pb2.FeatureAssignment, current: InstalledBundle | None) -> None:
        """A signed revert: back to exactly the bundle this device ran before, no download."""
        self._check_stop()
        good = self.features.last_known_good.get(a.feature)
        result: HookResult | None = None
        if a.active and good is not None and good.sha256 == a.sha256:
            if not good.intact():
                self._fail(a, "INSTALL_FAILED", "the last-known-good bundle on disk is damaged")
                return
            leaving = current.version if current is not None else ""
            result = self.hooks.run(
                "rollback",
                HookCall(
                    a.feature, good.version, good.file, good.sha256.hex(), leaving, a.rollout_id
                ),
            )
            if result.ok:
                self.features.revert_to_last_known_good(a.feature)
        elif a.active and current is not None and current.sha256 == a.sha256:
            if not current.active:  # switched off since: switch it on again
                result = self.hooks.run("activate", self._call(a, current.file, ""))
                if result.ok:
                    self.features.set_active(a.feature, True)
        elif a.active:
            self._fail(
                a,
                "ROLLBACK_REFUSED",
                f"revert to {a.feature} {a.version}, which is not this device's last-known-good",
            )
            return
        elif current is not None and current.active:
            result = self.hooks.run(
                "deactivate",
                HookCall(
                    a.feature, current.version, current.file, current.sha256.hex(), "", a.rollout_id
                ),
            )
            if result.ok:
                self.features.set_active(a.feature, False)
        if result is not None and not result.ok:
            self._fail(a, "INSTALL_FAILED", result.detail)
            return
        self.features.settle(a)
        self.features.save()
        self._report(a, "ROLLED_BACK")

    def _fail(self, a: common_pb2.FeatureAssignment, reason: str, detail: str) -> None:
        changed = self.features.abandon(a.feature)
        if reason in FINAL_REASONS:
            self.features.settle(a)
            changed = True
        if changed:
            self.features.save()
        log.warning("%s %s failed: %s: %s", a.feature, a.version, reason, detail)
        self._report(a, "FAILED", reason=reason, detail=detail)

    def _call(self, a: common_pb2.FeatureAssignment, bundle: Path, previous: str) -> HookCall:
        return HookCall(a.feature, a.version, bundle, a.sha256.hex(), previous, a.rollout_id)

    # -- health ------------------------------------------------------------------------------

    def _health(
        self, feature: str, version: str, bundle: InstalledBundle | None
    ) -> tuple[common_pb2.HealthSample, str]:
        """A health sample from the `health` hook (zeros without one) and the usage it
        reported, as the event's detail. A failing hook counts as one feature error."""
        uptime = int(time.monotonic() - self._boot)
        sample = common_pb2.HealthSample(uptime_seconds=max(uptime, 0))
        if not self.hooks.configured("health"):
            return sample, ""
        call = HookCall(
            feature,
            version,
            bundle.file if bundle is not None else None,
            bundle.sha256.hex() if bundle is not None else "",
        )
        result = self.hooks.run("health", call)
        if not result.ok:
            sample.feature_error_count = 1
            return sample, result.detail
        return _parse_health(result.stdout, sample)

    def _sample_health(self) -> None:
        """One sample per installed feature (ACTIVE or DEACTIVATED), or one for the device."""
        running = sorted(self.features.installed.items())
        targets: list[tuple[str, InstalledBundle | None]] = list(running) or [("", None)]
        for feature, bundle in targets:
            self._check_stop()
            version = bundle.version if bundle is not None else ""
            active = bundle is None or bundle.active
            if active:
                sample, detail = self._health(feature, version, bundle)
            else:
                sample, detail = common_pb2.HealthSample(), ""
            self._report(
                common_pb2.FeatureAssignment(
                    feature=feature,
                    version=version,
                    sha256=bundle.sha256 if bundle is not None else b"",
                ),
                "ACTIVE" if active else "DEACTIVATED",
                health=sample,
                detail=detail,
            )

    # -- reporting -----------------------------------------------------------------------------

    def _refuse_unverified(self, envelope: bytes, exc: VerificationError) -> None:
        log.warning("refused a desired state: %s", exc)
        try:
            env = common_pb2.Envelope.FromString(envelope)
            named = list(common_pb2.DesiredState.FromString(env.payload).features)
        except Exception:
            named = []
        for a in named or [common_pb2.FeatureAssignment()]:
            self._report(a, "FAILED", reason=exc.reason, detail=str(exc))

    def _report(
        self,
        a: common_pb2.FeatureAssignment,
        state: str,
        *,
        reason: str = "",
        detail: str = "",
        health: common_pb2.HealthSample | None = None,
    ) -> None:
        now = Timestamp()
        now.FromDatetime(self.clock.now())
        event = common_pb2.DeviceEvent(
            device_id=self.device_id,
            seq=self.sequence.next(),
            rollout_id=a.rollout_id,
            bundle_sha256=a.sha256,
            state=common_pb2.DeviceState.Value(state),
            error_code=common_pb2.FailureReason.Value(reason) if reason else 0,  # type: ignore[arg-type]
            detail=detail[:DETAIL_CHARS],
            time=now,
            feature=a.feature,
            version=a.version,
            health=health,
        )
        if health is None or a.rollout_id:  # not a periodic health sample
            log.info("%s %s: %s%s", a.feature, a.version, state, f" ({reason})" if reason else "")
        self._link.publish(self.topics.events(self.device_id), event.SerializeToString())
        if state in SETTLED or state == "FAILED":
            self._publish_state()

    def _reported(self, *, online: bool) -> bytes:
        now = Timestamp()
        now.FromDatetime(self.clock.now())
        return common_pb2.ReportedState(
            device_id=self.device_id,
            online=online,
            generation=self.trust.accepted_generation,
            features=[
                common_pb2.InstalledFeature(
                    feature=name, version=b.version, sha256=b.sha256, active=b.active
                )
                for name, b in sorted(self.features.installed.items())
            ],
            time=now,
        ).SerializeToString()

    def _publish_state(self) -> None:
        self._link.publish(
            self.topics.state(self.device_id), self._reported(online=True), retain=True
        )


def _parse_health(
    stdout: bytes, sample: common_pb2.HealthSample
) -> tuple[common_pb2.HealthSample, str]:
    """Read a health hook's report: empty, or one JSON object with optional
    ``crash_count``, ``feature_error_count`` (whole numbers) and ``usage`` (anything)."""
    text = stdout.decode("utf-8", "replace").strip()
    if not text:
        return sample, ""
    try:
        doc: Any = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        for key in ("crash_count", "feature_error_count"):
            value = doc.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be a whole number, 0 or more")
            setattr(sample, key, min(value, 2**32 - 1))
    except ValueError as exc:
        sample.feature_error_count = 1
        return sample, f"health hook output not understood: {exc}"[:DETAIL_CHARS]
    usage = doc.get("usage")
    detail = json.dumps({"usage": usage}, separators=(",", ":")) if usage is not None else ""
    return sample, detail[:DETAIL_CHARS]
