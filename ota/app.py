"""Composition root: builds the control plane from its config and runs it."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc

from ota import __version__
from ota.api.audit import AuditServicer
from ota.api.auth import Authenticator
from ota.api.bundles import BundleServicer
from ota.api.fleet import BrokerAccounts, FleetServicer
from ota.api.freshness import follow_changes
from ota.api.health import DatabaseProbe, HealthMonitor, ServiceHealth
from ota.api.reports import ReportServicer
from ota.api.rollouts import RolloutChanges, RolloutServicer
from ota.api.server import build_server
from ota.api.tokens import TokenServicer
from ota.api.webhooks import WebhookServicer
from ota.broker.passwords import PasswordFile
from ota.clock import Clock, SystemClock
from ota.config import ServerConfig
from ota.delivery.origin import Origin, OriginMetrics, OriginSettings
from ota.delivery.published import StoredBundles
from ota.delivery.purge import CachePurger
from ota.delivery.server import HttpListener
from ota.domain.webhooks import RetryPolicy
from ota.errors import InvalidArgument
from ota.metrics import Metrics, MetricsServer
from ota.rollout.commands import RolloutCommands
from ota.rollout.engine import RolloutEngine
from ota.rollout.lease import FencedStore, Lease
from ota.runtime import Signals, Worker
from ota.signing.keys import load_signer
from ota.store import changes as store_changes
from ota.store import control_accounts
from ota.store import fleet as fleet_store
from ota.store.blobs import BlobStore
from ota.store.bundles import SqlMetadataStore
from ota.store.database import connect, migrate, redacted
from ota.store.notices import ChangeNotices
from ota.store.session import Store
from ota.tls import ServerTls
from ota.transport.ingest_workers import IngestWorkers, WorkerSettings, sessions_file
from ota.transport.ingester import Ingester
from ota.transport.mqtt import MqttLink
from ota.transport.publisher import DesiredStatePublisher
from ota.transport.ratelimit import DeviceRateLimit, DeviceRateLimiter
from ota.transport.topics import Topics
from ota.transport.webhooks import Sender, WebhookWorker
from ota.trust.device_ca import DeviceCa
from ota.trust.director import Director
from ota.trust.freshness import TimestampRefresher
from ota.trust.repository import ImageRepository
from ota.web.app import Dashboard
from ota.web.server import DashboardServer

log = logging.getLogger(__name__)

# How long calls in flight may take to finish once the control plane stops.
SHUTDOWN_GRACE_SECONDS = 2.0


class MosquittoAccounts:
    """Device accounts in Mosquitto's password file; SIGHUP makes it re-read them."""

    def __init__(
        self,
        password_file: Path,
        pid_file: Path | None,
        *,
        reload: Callable[[], None] | None = None,
    ) -> None:
        self._file = PasswordFile(password_file)
        self._pid_file = pid_file
        self._reload_hook = reload

    def set_many(self, secrets: dict[str, str]) -> None:
        self._file.set_many(secrets)
        self._reload()

    def remove(self, username: str) -> None:
        self._file.remove(username)
        self._reload()

    def _reload(self) -> None:
        if self._reload_hook is not None:
            self._reload_hook()
            return
        if self._pid_file is None:
            return
        try:
            os.kill(int(self._pid_file.read_text().strip()), signal.SIGHUP)
        except (OSError, ValueError) as exc:
            log.warning("could not ask the broker to reload its accounts: %s", exc)


class BrokerRevocationNotices:
    """Names revoked devices to the broker over MQTT: nothing shared but the connection.

    The subscription guard plugin drops such a device's live connection and
    refuses all its traffic (docs/OPERATIONS.md, "Device certificates").
    After every connect of the control plane, the devices revoked with a
    certificate that has not expired are named again, since a restarted
    broker has forgotten them.
    """

    CHUNK = 1000

    def __init__(self, link: MqttLink, store: Store, clock: Clock) -> None:
        self._link = link
        self._store = store
        self._clock = clock

    def revoked(self, device_ids: list[str]) -> None:
        self._send(self._link.topics.revoked(), device_ids)

    def restored(self, device_ids: list[str]) -> None:
        self._send(self._link.topics.restored(), device_ids)

    def resync(self) -> None:
        try:
            with self._store.transaction() as session:
                ids = fleet_store.revoked_with_live_certificates(session, self._clock.now())
        except Exception:
            log.exception("could not read the revoked devices to name them to the broker")
            return
        self.revoked(ids)

    def _send(self, topic: str, device_ids: list[str]) -> None:
        for i in range(0, len(device_ids), self.CHUNK):
            self._link.publish_control(topic, "\n".join(device_ids[i : i + self.CHUNK]).encode())


class CrlFile:
    """Keeps the device CA's CRL in a file a broker on this host reads, and signals it.

    Rewritten on each revocation or renewal, and every few hours besides: a CRL
    lapses after `CRL_VALIDITY`, and then OpenSSL refuses every device.
    """

    REFRESH_SECONDS = 6 * 3600.0

    def __init__(self, path: Path, pid_file: Path | None, make_crl: Callable[[], bytes]) -> None:
        self._path = path
        self._pid_file = pid_file
        self._make = make_crl
        self._lock = threading.Lock()
        # Written when built; the worker's first run (at start) and each one after
        # REFRESH_SECONDS write it again.
        self._worker = Worker("crl", self.write, interval=self.REFRESH_SECONDS, join_seconds=5.0)

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def write(self) -> None:
        with self._lock:
            data = self._make()
            tmp = self._path.with_name(f".{self._path.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self._path)
        if self._pid_file is None:
            return
        try:
            os.kill(int(self._pid_file.read_text().strip()), signal.SIGHUP)
        except (OSError, ValueError) as exc:
            log.warning("could not ask the broker to reload its CRL: %s", exc)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read the {what} at {path}: {exc.strerror}", field=what
        ) from exc


def announce(config: ServerConfig) -> None:
    """The first log lines: what this control plane runs on, no secret in them.

    An operator reading a log after an incident must see which database and
    broker a process used, as whom, and on which address it answered.
    """
    log.info("ota %s starting as replica %r", __version__, replica_name(config))
    log.info("database %s", redacted(config.database_url))
    log.info("broker %s as user %r", broker_address(config.mqtt_url), config.mqtt_username)
    tls = "TLS" if config.tls_cert_file else "plaintext"
    if config.tls_client_ca_file:
        tls = "mTLS"
    log.info("gRPC listen %s (%s)", config.listen, tls)
    if config.device_listen:
        log.info("device gRPC listen %s (mutual TLS, device CA)", config.device_listen)
    if config.metrics_listen:
        log.info("metrics listen %s", config.metrics_listen)


def claim_control_account(store: Store, username: str, clock: Clock) -> None:
    """Record the broker username this control plane connects as, so no device takes it.

    A device already registered under it (or under `username-*`, the names of
    this control plane's extra connections) would hold a control account:
    refuse to start rather than share it.
    """
    with store.transaction() as session:
        taken = control_accounts.devices_in_namespace(session, username)
        if taken:
            raise InvalidArgument(
                f"{username!r} and {username}-* are this control plane's broker accounts, "
                f"but registered devices are named so ({', '.join(taken)}); a device id is "
                "its broker username: choose another mqtt_username",
                field="mqtt_username",
            )
        control_accounts.record(session, username, clock.now())


def replica_name(config: ServerConfig) -> str:
    """The engine lease's holder name: replica_id, else the MQTT username."""
    return config.replica_id or config.mqtt_username


def broker_address(url: str) -> str:
    """The broker URL without any user or password written into it."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def server_tls(config: ServerConfig) -> ServerTls | None:
    if not config.tls_cert_file:
        return None
    return ServerTls(
        Path(config.tls_cert_file),
        Path(config.tls_key_file),
        Path(config.tls_client_ca_file) if config.tls_client_ca_file else None,
    )


@dataclass
class ControlPlane:
    """A running control plane: gRPC server, engine, publisher, ingester."""

    config: ServerConfig
    port: int
    server: grpc.Server
    engine: RolloutEngine
    publisher: DesiredStatePublisher
    ingester: Ingester  # the in-process one
    link: MqttLink
    store: Store
    refresher: TimestampRefresher
    lease: Lease
    webhooks: WebhookWorker
    ingest: IngestWorkers  # all of ingest: `ingester` and any worker processes
    metrics: Metrics = field(default_factory=Metrics)
    metrics_server: MetricsServer | None = None
    origin: Origin | None = None
    origin_server: HttpListener | None = None
    auth: Authenticator | None = None
    clock: Clock | None = None
    dashboard_server: DashboardServer | None = None
    device_port: int = 0
    crl_file: CrlFile | None = None
    change_notices: ChangeNotices | None = None
    purger: CachePurger | None = None
    signals: Signals = field(default_factory=Signals)
    health: ServiceHealth | None = None
    health_monitor: HealthMonitor | None = None

    @classmethod
    def build(
        cls,
        config: ServerConfig,
        clock: Clock | None = None,
        *,
        accounts: BrokerAccounts | None = None,
    ) -> ControlPlane:
        clock = clock or SystemClock()
        # A database that is not there is one line, before any other.
        engine_db = connect(config.database_url)
        announce(config)
        migrate(engine_db)
        store = Store(engine_db)
        claim_control_account(store, config.mqtt_username, clock)
        purger = CachePurger(config.origin_caches)
        repo = ImageRepository(
            SqlMetadataStore(store),
            snapshot_signer=load_signer(config.snapshot_key, field="snapshot_key"),
            timestamp_signer=load_signer(config.timestamp_key, field="timestamp_key"),
            clock=clock,
            on_root_rotated=purger.root_rotated,
        )
        repo.bootstrap(
            _read(config.root_file, "root_file"),
            _read(config.initial_targets_file, "initial_targets_file"),
        )
        director = Director(load_signer(config.director_key, field="director_key"))
        topics = Topics(config.topic_root)
        link = MqttLink(
            config.mqtt_url,
            username=config.mqtt_username,
            password=config.mqtt_password,
            topics=topics,
            receive_maximum=max(2 * config.ingest_batch_size, 100),
            ca_file=config.mqtt_ca_file,
            publish_connections=config.publish_connections,
        )
        # Every replica serves and ingests; the engine lease's holder alone does
        # what must happen once: the engine, publishing, re-signing the timestamp.
        signals = Signals()
        lease = Lease(
            store,
            clock,
            holder=replica_name(config),
            duration_seconds=config.lease_duration_seconds,
            renew_seconds=config.lease_renew_seconds,
            on_acquired=signals.lease_gained.emit,
            on_lost=signals.lease_lost.emit,
        )
        # The lease holder's writes: each transaction first proves the lease is held.
        fenced = FencedStore(engine_db, lease)
        publisher = DesiredStatePublisher(
            link,
            store,
            holds_lease=lease.held,
            poll_seconds=config.publish_poll_seconds,
            fenced=fenced,
            wake_on=[signals.desired_committed, signals.lease_gained],
        )
        # WatchRollout streams look again on any change of a rollout or its progress.
        changes = RolloutChanges()
        signals.rollout_changed.connect(changes.notify)
        signals.progress_ingested.connect(changes.notify)
        metrics = Metrics()
        ttl = timedelta(seconds=config.desired_state_ttl_seconds)
        engine = RolloutEngine(
            fenced,
            director,
            clock,
            on_notify=signals.desired_committed.emit,
            on_change=signals.rollout_changed.emit,
            desired_ttl=ttl,
            interval=config.engine_interval_seconds,
            holds_lease=lease.held,
            metrics=metrics,
            wake_on=[signals.rollout_changed, signals.lease_gained],
            coalesce_on=[signals.progress_ingested],
        )

        def command_done() -> None:
            # A command may have committed desired states (rollback, kill) and changed
            # a rollout: both are raised, whichever it was.
            signals.desired_committed.emit()
            signals.rollout_changed.emit()

        commands = RolloutCommands(
            store, director, clock, desired_ttl=ttl, on_change=command_done, metrics=metrics
        )
        device_ca = (
            DeviceCa.load(
                Path(config.device_ca_cert_file),
                Path(config.device_ca_key_file),
                crl_url=config.device_crl_url,
            )
            if config.device_ca_cert_file
            else None
        )
        auth = Authenticator(
            store,
            config.tokens,
            clock,
            device_ca=device_ca,
            token_cache_seconds=config.token_cache_seconds,
        )
        revocations = BrokerRevocationNotices(link, store, clock)
        link.on_connected = revocations.resync
        crl_file: CrlFile | None = None
        fleet_servicer: FleetServicer | None = None
        if config.device_crl_file:

            def make_crl() -> bytes:
                assert fleet_servicer is not None
                return fleet_servicer.device_crl()

            crl_file = CrlFile(
                Path(config.device_crl_file),
                Path(config.broker_pid_file) if config.broker_pid_file else None,
                make_crl,
            )
        if accounts is None and config.broker_password_file:
            pid = Path(config.broker_pid_file) if config.broker_pid_file else None
            accounts = MosquittoAccounts(Path(config.broker_password_file), pid)
        flood_guard = DeviceRateLimiter(
            DeviceRateLimit(rate=config.ingest_device_rate, burst=config.ingest_device_burst)
        )
        sender = Sender(
            timeout_seconds=config.webhook_timeout_seconds, ca_file=config.webhook_ca_file
        )
        fleet_servicer = FleetServicer(
            store,
            clock,
            auth,
            accounts=accounts,
            mqtt_url=config.mqtt_url,
            topic_root=config.topic_root,
            flood_guard=flood_guard,
            device_ca=device_ca,
            revocations=revocations,
            on_certificates_changed=crl_file.write if crl_file else None,
            device_mqtt_url=config.device_mqtt_url,
            crl_superseded=config.device_crl_superseded,
        )
        if crl_file is not None:
            crl_file.write()
        rollout_servicer = RolloutServicer(
            store, commands, changes, auth, cache_seconds=config.rollout_cache_seconds
        )
        # Other replicas' commands, engine steps and ingested progress, heard by
        # PostgreSQL notices, wake this one's engine and watches like its own.
        change_notices = follow_changes(
            engine_db,
            rollout_servicer.views,
            auth,
            on_rollout_changed=signals.rollout_changed.emit,
        )
        server, port, health = build_server(
            config.listen,
            auth=auth,
            bundles=BundleServicer(store, BlobStore(config.data_dir / "blobs"), repo, clock),
            rollouts=rollout_servicer,
            fleet=fleet_servicer,
            reports=ReportServicer(store, clock),
            tokens=TokenServicer(store, clock, auth),
            webhooks=WebhookServicer(
                store, clock, auth, sender, allow_http=config.webhook_allow_http
            ),
            audit=AuditServicer(store),
            tls=server_tls(config),
            metrics=metrics,
            device_listen=config.device_listen,
            device_tls=(
                ServerTls(
                    Path(config.tls_cert_file),
                    Path(config.tls_key_file),
                    Path(config.device_ca_cert_file),
                )
                if config.device_listen
                else None
            ),
        )
        ingester = Ingester(
            link,
            store,
            clock,
            batch_size=config.ingest_batch_size,
            max_payload_bytes=config.ingest_max_payload_bytes,
            rate_limiter=flood_guard,
        )
        ingest = IngestWorkers(
            WorkerSettings(
                database_url=config.database_url,
                mqtt_url=config.mqtt_url,
                control_username=config.mqtt_username,
                password=config.mqtt_password,
                topic_root=config.topic_root,
                ca_file=config.mqtt_ca_file,
                batch_size=config.ingest_batch_size,
                max_payload_bytes=config.ingest_max_payload_bytes,
                log_level=logging.getLogger().getEffectiveLevel(),
            ),
            config.ingest_workers,
            local=ingester,
            limiter=flood_guard,
            sessions_file=sessions_file(config.data_dir, config.mqtt_username),
            # This session ingests until the workers' sessions are subscribed.
            on_ready=link.stop_ingesting,
            committed_elsewhere=lambda ids: store_changes.committed(
                engine_db, {store_changes.ROLLOUTS: set(ids)}
            ),
        )
        # Rollouts whose progress a batch moved, here or in a worker process.
        ingest.on_progress = lambda _rollouts: signals.progress_ingested.emit()
        refresher = TimestampRefresher(
            repo, holds_lease=lease.held, fenced=SqlMetadataStore(fenced)
        )
        database_probe = DatabaseProbe(engine_db)
        health_monitor = HealthMonitor(
            health,
            broker_up=link.connected.is_set,
            database_up=database_probe,
            on_stop=database_probe.close,
        )
        health_monitor.watch_errors(engine_db)
        # Deliveries go out from the lease holder only, so replicas never both send one.
        webhook_worker = WebhookWorker(
            store,
            clock,
            sender,
            retry=RetryPolicy(
                base_seconds=config.webhook_retry_base_seconds,
                max_seconds=config.webhook_retry_max_seconds,
                max_attempts=config.webhook_max_attempts,
            ),
            holds_lease=lease.held,
        )
        metrics.watch(store, ingest)
        metrics.watch_health(lambda: health.serving is True)
        metrics.watch_process(
            replica=lease.holder, holds_lease=lease.held, broker_up=link.connected.is_set
        )
        origin = Origin(
            repo,
            StoredBundles(store),
            OriginSettings(
                blobs=config.data_dir / "blobs",
                timestamp_max_age=config.origin_timestamp_max_age,
                token=config.origin_token,
                next_root_max_age=config.next_root_404_max_age,
            ),
            OriginMetrics(metrics.registry),
            devices=auth.device_of_certificate if config.origin_device_certificates else None,
        )
        return cls(
            config,
            port,
            server,
            engine,
            publisher,
            ingester,
            link,
            store,
            refresher,
            lease,
            webhook_worker,
            ingest,
            metrics,
            origin=origin,
            auth=auth,
            clock=clock,
            device_port=getattr(server, "device_port", 0),
            crl_file=crl_file,
            change_notices=change_notices,
            purger=purger,
            signals=signals,
            health=health,
            health_monitor=health_monitor,
        )

    def start(self) -> None:
        if self.config.metrics_listen:
            # First: a port in use fails here, before any other thread runs.
            self.metrics_server = self.metrics.serve(self.config.metrics_listen)
        if self.config.origin_listen and self.origin is not None:
            self.origin_server = HttpListener(  # binds its port: a port in use fails here too
                self.origin.app,
                self.config.origin_listen,
                name="delivery origin",
                field="origin_listen",
                tls_cert_file=self.config.origin_tls_cert_file,
                tls_key_file=self.config.origin_tls_key_file,
                client_ca_file=(
                    self.config.device_ca_cert_file
                    if self.config.origin_device_certificates
                    else ""
                ),
            )
        if self.config.dashboard_listen:
            self.dashboard_server = self._dashboard()  # binds its port: fails here too
        if self.change_notices is not None:
            self.change_notices.start()
        self.link.start()
        self.ingest.start()
        self.publisher.start()
        self.lease.start()
        self.engine.start()
        self.refresher.start()
        self.webhooks.start()
        if self.crl_file is not None:
            self.crl_file.start()
        if self.health_monitor is not None:
            self.health_monitor.check()  # the first answer is true before the first call
            self.health_monitor.start()
        self.server.start()
        log.info("control plane serving gRPC on port %d", self.port)
        if self.origin_server is not None:
            self.origin_server.start()
        if self.dashboard_server is not None:
            self.dashboard_server.start()
        if self.metrics_server is not None:
            log.info("metrics at http://%s/metrics", self.metrics_address)

    def _dashboard(self) -> DashboardServer:
        assert self.auth is not None and self.clock is not None
        cert, key = self.config.dashboard_tls
        dashboard = Dashboard(self.store, self.auth, self.clock, secure_cookies=bool(cert))
        self.metrics.watch_dashboard(
            lambda: len(dashboard.sessions),
            lambda: dashboard.live.watching,
            lambda: dashboard.live.renders,
        )
        return DashboardServer(
            dashboard, self.config.dashboard_listen, tls_cert_file=cert, tls_key_file=key
        )

    @property
    def dashboard_url(self) -> str:
        """The dashboard's URL, once started; empty when off."""
        return self.dashboard_server.url if self.dashboard_server is not None else ""

    @property
    def metrics_address(self) -> str:
        """host:port of the metrics endpoint, once started; empty when off."""
        if self.metrics_server is None:
            return ""
        host = self.config.metrics_listen.rpartition(":")[0] or "0.0.0.0"
        return f"{host}:{self.metrics_server.port}"

    @property
    def origin_url(self) -> str:
        """Base URL of the delivery origin, once started; empty when off."""
        return self.origin_server.url if self.origin_server is not None else ""

    def stop(self) -> None:
        # NOT_SERVING first, so balancers send new work elsewhere while calls in
        # flight get the grace period to finish; no later check can undo it.
        if self.health is not None:
            self.health.shutdown()
        if self.health_monitor is not None:
            self.health_monitor.stop()
        if self.origin_server is not None:
            self.origin_server.stop()
        if self.dashboard_server is not None:
            self.dashboard_server.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.server.stop(grace=SHUTDOWN_GRACE_SECONDS).wait()
        self.engine.stop()
        self.refresher.stop()
        self.webhooks.stop()
        if self.crl_file is not None:
            self.crl_file.stop()
        self.publisher.stop()
        if self.purger is not None:
            self.purger.stop()
        self.lease.stop()  # after its work stopped: hands over without waiting for expiry
        self.ingest.stop()
        self.link.stop()
        if self.change_notices is not None:
            self.change_notices.stop()
        self.store.engine.dispose()
