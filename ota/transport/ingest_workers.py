"""Ingest worker processes: each a member of the shared subscription, with its own GIL.

One process cannot ingest faster than its one GIL allows, and paho's network
thread takes about half of it (docs/PERFORMANCE.md, "telemetry-ingest"). With
`ingest_workers` at 2 or more, the control plane starts that many child
processes. Each is one more member of the shared ingest subscription, under a
broker account of its own (`worker_username`: the broker names a session after
its user), with its own MQTT session and database connections, and runs the
same `Ingester` as the control plane does in process. The broker splits device
messages between them as it splits them between replicas, with the same
guarantees (acknowledged after commit, stored once by (device, seq), progress
rows locked).

What stays in the parent, over one pipe per worker:

- the per-device flood guard: a worker asks it once per batch, so one device's
  messages, spread over the workers by the broker, spend one bucket, and the
  API's flags (GetDevice) see every drop;
- the counters: each committed batch reports what it stored and dropped, and
  the rollouts it stored new events of (`on_progress`, and the parent's change
  listeners: the read model); the backlog is reported as it changes. The
  parent's /metrics shows the totals;
- the log: a worker's records are emitted by the parent's logging.

A worker dies with its parent (PR_SET_PDEATHSIG, and it looks at its parent's
pid every half second where that is missing); the parent restarts a worker that
died, under the same account, so the broker hands it the messages its session
kept meanwhile (at least once: those in flight and not committed come again,
and are stored once).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ota.clock import SystemClock
from ota.errors import Unavailable
from ota.store.database import connect
from ota.store.session import Store
from ota.transport.ingester import Admission, BatchDone, Ingester
from ota.transport.mqtt import MqttLink
from ota.transport.topics import Topics

log = logging.getLogger(__name__)

# A worker that dies sooner than this after its start is failing to start (a
# refused account, say): it is restarted after a pause that doubles, up to
# _MAX_RESTART_PAUSE, instead of at once.
_QUICK_DEATH_SECONDS = 10.0
_MAX_RESTART_PAUSE = 30.0
# A retiring worker (one no longer configured) ends its session once its inbox has
# stayed empty this long: its queue has been delivered by then.
_RETIRE_IDLE_SECONDS = 3.0
# Exit status of a worker that cannot start (broker or database not reachable).
EXIT_UNAVAILABLE = 3
_LOG_EXTRAS = ("device_id", "rollout_id", "reason")


def worker_username(control_username: str, index: int) -> str:
    """The broker account of ingest worker `index` (from 1) of a control plane's account."""
    return f"{control_username}-ingest-{index}"


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker process needs (sent to it when it starts)."""

    database_url: str
    mqtt_url: str
    control_username: str  # the control plane's own; each worker's is derived from it
    password: str  # the control plane's: one secret per replica
    topic_root: str = "ota/v1"
    ca_file: str = ""
    batch_size: int = 500
    max_payload_bytes: int = 64 * 1024
    log_level: int = logging.INFO


@dataclass
class _Worker:
    index: int
    retiring: bool = False
    process: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    started: float = 0.0
    backlog: int = 0
    quick_deaths: int = 0
    restart_at: float | None = None
    done: bool = False
    pid: int = 0
    subscribed: bool = False  # once, ever: its session holds the subscription since


@dataclass
class _Totals:
    stored: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    lag_seconds: float = 0.0


class IngestWorkers:
    """The control plane's ingest: its in-process ingester and any worker processes.

    Counters are totals over all of them, kept across worker restarts; this is
    what /metrics reads (`ota.metrics.IngestStats`). With fewer than two workers
    configured no process is started, and ingest runs in process (`local`).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        count: int,
        *,
        local: Ingester,
        limiter: Admission | None,
        sessions_file: Path | None = None,
        on_ready: Callable[[], None] | None = None,
        committed_elsewhere: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self.count = count if count >= 2 else 0
        self._on_ready = on_ready
        # A worker's commits reach this process's change listeners (the read model)
        # through this: on SQLite nothing else tells them.
        self._committed_elsewhere = committed_elsewhere
        self._ready = threading.Event()
        self._settings = settings
        self._local = local
        self._limiter = limiter
        self._sessions_file = sessions_file
        # Called with the rollouts a committed batch stored new events of (their
        # progress moved), on an ingest thread: keep it quick (wake something up).
        self.on_progress: Callable[[frozenset[str]], None] | None = None
        self.restarts = 0
        self._totals = _Totals()
        self._lock = threading.Lock()
        local.on_batch = self._local_batch
        previous = _read_sessions(sessions_file)
        self._workers = [_Worker(i) for i in range(1, self.count + 1)] + [
            _Worker(i, retiring=True) for i in range(self.count + 1, previous + 1)
        ]
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._thread = threading.Thread(target=self._supervise, name="ota-ingest-workers")

    # What /metrics reads.

    @property
    def stored(self) -> int:
        return self._totals.stored

    @property
    def dropped(self) -> Mapping[str, int]:
        with self._lock:
            return dict(self._totals.dropped)

    @property
    def lag_seconds(self) -> float:
        return self._totals.lag_seconds

    def backlog(self) -> int:
        return self._local.backlog() + sum(w.backlog for w in self._workers)

    def alive(self) -> int:
        """Worker processes running now (retiring ones included)."""
        return sum(1 for w in self._workers if w.process is not None and w.process.poll() is None)

    def pids(self) -> dict[int, int]:
        """Worker index -> process id, of the workers running now."""
        return {w.index: w.pid for w in self._workers if w.process is not None and w.pid}

    def retiring(self) -> list[int]:
        """Indexes of workers no longer configured whose sessions are still being drained."""
        return [w.index for w in self._workers if w.retiring and not w.done]

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every configured worker's session holds the ingest subscription."""
        return not self.count or self._ready.wait(timeout)

    # Life cycle.

    def start(self) -> None:
        self._local.start()
        if not self._workers:
            return
        # The highest worker index that may hold a session at the broker, written
        # before any starts: a later run with fewer workers retires the rest.
        _write_sessions(self._sessions_file, len(self._workers))
        for worker in self._workers:
            worker.restart_at = 0.0
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.terminate()  # SIGTERM: finish the batch, keep the session
        self._wake_w.send(None)
        if self._thread.is_alive():
            self._thread.join(timeout=20)
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                log.warning("ingest worker %d did not stop; killing it", worker.index)
                worker.process.kill()
                worker.process.wait(timeout=5)
        self._local.stop()

    # The supervisor thread: every worker's pipe and exit, and their restarts.

    def _supervise(self) -> None:
        # Workers are started from this thread only: PR_SET_PDEATHSIG fires when the
        # thread that started a process ends, and this one outlives every worker.
        while True:
            now = time.monotonic()
            live = [w for w in self._workers if w.process is not None]
            if self._stopping.is_set() and not live:
                return
            if not self._stopping.is_set():
                for worker in self._workers:
                    due = worker.restart_at is not None and worker.restart_at <= now
                    if worker.process is None and due:
                        self._spawn(worker)
            waiting: list[Any] = [self._wake_r]
            owners: dict[Any, _Worker] = {}
            for worker in self._workers:
                # A worker's end closes its end of the pipe: EOF here is its exit.
                if worker.process is not None and worker.conn is not None:
                    waiting.append(worker.conn)
                    owners[worker.conn] = worker
            pending = [w.restart_at for w in self._workers if w.restart_at is not None]
            timeout = max(0.0, min([1.0, *(at - now for at in pending)]))
            for ready in wait(waiting, timeout):
                if ready is self._wake_r:
                    self._wake_r.recv()
                    continue
                worker = owners[ready]
                self._receive(worker)
                if worker.conn is None:
                    self._exited(worker)

    def _spawn(self, worker: _Worker) -> None:
        ours, theirs = multiprocessing.Pipe()
        # A fresh interpreter that imports only what ingest needs, not this program's
        # __main__ (which a multiprocessing spawn would import again); sys.path as here.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_ENTRY, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            ours.close()
            log.error("cannot start ingest worker %d: %s", worker.index, exc)
            worker.restart_at = time.monotonic() + _MAX_RESTART_PAUSE
            return
        finally:
            theirs.close()
        with contextlib.suppress(OSError):  # died at once: the next wait sees its EOF
            ours.send((self._settings, worker.index, worker.retiring))
        worker.process, worker.conn = process, ours
        worker.pid = process.pid
        worker.started, worker.restart_at, worker.backlog = time.monotonic(), None, 0
        log.info(
            "ingest worker %d started (pid %d)%s",
            worker.index,
            worker.pid,
            ", draining a session no longer configured" if worker.retiring else "",
        )

    def _receive(self, worker: _Worker) -> None:
        conn = worker.conn
        assert conn is not None
        try:
            while conn.poll():
                message = conn.recv()
                try:
                    self._handle(worker, conn, message)
                except (EOFError, OSError):
                    raise
                except Exception:
                    # This thread serves every worker: one bad message must not end it.
                    log.exception("ingest worker %d: cannot handle %r", worker.index, message[0])
        except (EOFError, OSError):
            conn.close()
            worker.conn = None

    def _exited(self, worker: _Worker) -> None:
        assert worker.process is not None
        try:
            code: int | None = worker.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            # It closed its pipe but lives on: of no use without one.
            worker.process.kill()
            code = worker.process.wait()
        lived = time.monotonic() - worker.started
        worker.process, worker.backlog, worker.pid = None, 0, 0
        if worker.retiring and code == 0:
            worker.done = True
            log.info("ingest worker %d drained its session and ended it", worker.index)
            if not self.retiring():
                _write_sessions(self._sessions_file, self.count)
            return
        if self._stopping.is_set():
            return
        self.restarts += 1
        worker.quick_deaths = worker.quick_deaths + 1 if lived < _QUICK_DEATH_SECONDS else 0
        pause = min(2.0 ** (worker.quick_deaths - 1), _MAX_RESTART_PAUSE)
        pause = pause if worker.quick_deaths else 0.0
        log.warning(
            "ingest worker %d ended (%s) after %.1f s; restarting it%s",
            worker.index,
            _exit_text(code),
            lived,
            f" in {pause:g} s" if pause else "",
        )
        worker.restart_at = time.monotonic() + pause

    def _handle(self, worker: _Worker, conn: Connection, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "admit":
            ids: list[str] = message[1]
            answer = [True] * len(ids)
            try:
                if self._limiter is not None:
                    answer = self._limiter.admit_many(ids)
            finally:
                conn.send(answer)  # always: the worker waits for it
        elif kind == "batch":
            _, stored, dropped, progressed, lag, backlog = message
            worker.backlog = backlog
            if progressed and self._committed_elsewhere is not None:
                self._committed_elsewhere(frozenset(progressed))
            self._count(BatchDone(stored, Counter(dropped), frozenset(progressed)), lag)
        elif kind == "backlog":
            worker.backlog = message[1]
        elif kind == "subscribed":
            worker.subscribed = True
            active = [w for w in self._workers if not w.retiring]
            if not self._ready.is_set() and all(w.subscribed for w in active):
                self._ready.set()
                log.info("ingest runs in %d worker processes", self.count)
                if self._on_ready is not None:
                    self._on_ready()
        elif kind == "log":
            _, name, level, text, extra = message
            logger = logging.getLogger(name)
            if logger.isEnabledFor(level):
                extra = {**extra, "ingest_worker": worker.index}
                record = logger.makeRecord(
                    name, level, "(ingest worker)", 0, text, (), None, extra=extra
                )
                logger.handle(record)

    def _local_batch(self, done: BatchDone) -> None:
        self._count(done, self._local.lag_seconds)

    def _count(self, done: BatchDone, lag: float) -> None:
        with self._lock:
            self._totals.stored += done.stored
            self._totals.dropped.update(done.dropped)
            self._totals.lag_seconds = lag
        if done.progressed and self.on_progress is not None:
            try:
                self.on_progress(done.progressed)
            except Exception:
                log.exception("ingest: on_progress failed")


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_UNAVAILABLE:
        return "broker or database unavailable"
    return f"exit status {code}"


def _read_sessions(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return max(0, int(path.read_text().strip() or 0))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); no ingest worker sessions to retire", path, exc)
        return 0


def _write_sessions(path: Path | None, count: int) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(f"{count}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot record the ingest worker sessions in %s: %s", path, exc)


# The worker process.


class _Parent(Admission):
    """A worker's side of its pipe: asks the flood guard, reports batches and logs."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        self._asking = threading.Lock()
        self._backlog = -1

    def send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    def admit_many(self, device_ids: Sequence[str]) -> list[bool]:
        with self._asking:  # the parent answers each question in turn, on this pipe
            self.send(("admit", list(device_ids)))
            answer: list[bool] = self._conn.recv()
            return answer

    def batch(self, done: BatchDone, lag: float, backlog: int) -> None:
        self._backlog = backlog
        self.send(("batch", done.stored, dict(done.dropped), tuple(done.progressed), lag, backlog))

    def backlog(self, backlog: int) -> None:
        if backlog != self._backlog:
            self._backlog = backlog
            self.send(("backlog", backlog))


class _ToParent(logging.Handler):
    """Log records go to the parent, which emits them with its own handlers and format."""

    def __init__(self, parent: _Parent) -> None:
        super().__init__()
        self._parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            extra = {k: getattr(record, k) for k in _LOG_EXTRAS if hasattr(record, k)}
            self._parent.send(("log", record.name, record.levelno, text, extra))
        except Exception:
            self.handleError(record)


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the parent-pid check in the main loop still ends it


_WORKER_ENTRY = "from ota.transport.ingest_workers import worker_entry; worker_entry()"


def worker_entry() -> None:
    """`python -c _WORKER_ENTRY FD`: the pipe's fd; the settings come first through it."""
    _die_with_parent()
    conn = Connection(int(sys.argv[1]))
    try:
        settings, index, retiring = conn.recv()
    except EOFError:
        return  # the parent ended before this process could ask to die with it
    worker_main(settings, index, retiring, conn)


def worker_main(settings: WorkerSettings, index: int, retiring: bool, conn: Connection) -> None:
    """A worker process's life: ingest until SIGTERM or the parent's end."""
    parent_pid = os.getppid()
    if parent_pid == 1:
        return  # the parent ended before this process could ask to die with it
    parent = _Parent(conn)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ToParent(parent))
    root.setLevel(settings.log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signo, _frame: stop.set())
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    username = worker_username(settings.control_username, index)
    try:
        store = Store(connect(settings.database_url))
        link = MqttLink(
            settings.mqtt_url,
            username=username,
            password=settings.password,
            topics=Topics(settings.topic_root),
            receive_maximum=max(2 * settings.batch_size, 100),
            ca_file=settings.ca_file,
            ingest=not retiring,
        )
        link.start()
        if not retiring:
            if not link.subscribed.wait(30):
                raise Unavailable("the broker did not grant the ingest subscription")
            parent.send(("subscribed",))
    except Unavailable as exc:
        log.error("ingest worker %d (broker user %r) cannot start: %s", index, username, exc)
        sys.exit(EXIT_UNAVAILABLE)
    last_batch = time.monotonic()

    def report(done: BatchDone) -> None:
        nonlocal last_batch
        last_batch = time.monotonic()
        parent.batch(done, ingester.lag_seconds, ingester.backlog())

    ingester = Ingester(
        link,
        store,
        SystemClock(),
        batch_size=settings.batch_size,
        max_payload_bytes=settings.max_payload_bytes,
        rate_limiter=parent,
        on_batch=report,
    )
    ingester.start()
    drained = False
    try:
        while not stop.wait(0.5):
            if os.getppid() != parent_pid:
                return  # the parent is gone; nobody to report to
            backlog = ingester.backlog()
            parent.backlog(backlog)
            idle = time.monotonic() - last_batch
            if retiring and backlog == 0 and idle > _RETIRE_IDLE_SECONDS:
                drained = True
                break
    finally:
        ingester.stop()
        # A drained retiring session is ended, so the broker forgets it; any other
        # is kept, with what the broker queues for it until this worker is back.
        link.stop(end_session=drained)
        store.engine.dispose()


def sessions_file(data_dir: Path, control_username: str) -> Path:
    """Where a control plane records how many worker sessions it may have at the broker."""
    return data_dir / "ingest" / f"{control_username}.workers"


def all_worker_usernames(control_usernames: Iterable[str], workers: int) -> list[str]:
    """Every ingest worker account of `control_usernames` with `workers` workers each."""
    return [worker_username(u, i) for u in control_usernames for i in range(1, workers + 1)]
