"""A private Mosquitto broker as a child process, for `ota dev`, demos and tests."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from ota.broker.config import BrokerFiles, BrokerSettings, write_broker_config
from ota.errors import FailedPrecondition, Unavailable

_FALLBACK_BINARY = "/usr/sbin/mosquitto"  # Debian puts it outside a user's PATH
# Logged by Mosquitto's main loop right before it re-reads the config, password
# and ACL files; it does that work before serving any other socket event.
_RELOAD_LINE = "Reloading config."


def find_mosquitto() -> str:
    """The path of the mosquitto binary, or a clear error saying how to install it."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise Unavailable(
        "the mosquitto broker is not installed (looked on PATH and in /usr/sbin); "
        "install it with `apt-get install mosquitto` (or `brew install mosquitto`)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def port_accepts(host: str, port: int, *, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_log_line(log_file: Path, needle: str, *, start_offset: int, timeout: float) -> None:
    """Wait until `needle` appears in `log_file` after byte `start_offset`."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            with log_file.open("rb") as f:
                f.seek(start_offset)
                if needle.encode() in f.read():
                    return
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            raise Unavailable(f"mosquitto did not log {needle!r} in {log_file} within {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def raise_open_files_limit(pid: int, wanted: int) -> int:
    """Raise process `pid`'s open-file limit towards `wanted`; returns the soft limit set.

    Every client connection is an open file; distributions start processes
    with a soft limit of 1 024, which caps a broker at about 1 000 devices.
    Root may raise the hard limit as well; anyone else gets up to the hard one.
    Set right after the broker is spawned, before it accepts its first client.
    """
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    except ProcessLookupError:
        return 0  # already gone; the caller reports why
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (wanted, max(wanted, hard)))
        return wanted
    except (PermissionError, ValueError, ProcessLookupError):
        pass
    new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (new_soft, hard))
    except (PermissionError, ValueError, ProcessLookupError):
        return soft
    return new_soft


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _catches_sighup(pid: int) -> bool:
    """Whether the process has installed a SIGHUP handler (Linux: SigCgt in /proc); True
    where /proc cannot tell."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class MosquittoProcess:
    """One ``mosquitto -c <conf>`` child process.

    `start` returns once the listener accepts connections; `reload` makes the
    broker re-read its password and ACL files (SIGHUP) and returns once it
    has; `stop` terminates it (the broker saves its persistence database) and
    kills it if it does not exit in time. Use it as a context manager.
    """

    def __init__(
        self,
        files: BrokerFiles,
        *,
        host: str,
        port: int,
        binary: str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        max_open_files: int = BrokerSettings.max_open_files,
    ) -> None:
        self.files = files
        self.max_open_files = max_open_files
        self.host = host
        self.port = port
        self.binary = binary or find_mosquitto()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        # Messages before the log file is open (config errors) go to the console.
        self.console_log = files.log_file.with_name("mosquitto.console.log")
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self.open_files_limit: int | None = None  # what the running broker got

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        """Start the broker and wait until its listener accepts connections."""
        if self.running:
            raise FailedPrecondition(f"mosquitto is already running (pid {self.pid})")
        # Otherwise the readiness probe below could succeed against a stranger.
        if port_accepts(self.host, self.port):
            raise Unavailable(
                f"port {self.port} on {self.host} is already in use; "
                "choose another port (0 picks a free one)"
            )
        self._console = self.console_log.open("ab")
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.files.conf)],
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            # Its own process group: a Ctrl-C meant for the parent's foreground
            # work does not kill the broker before the parent stops it cleanly.
            start_new_session=True,
        )
        try:
            self.open_files_limit = raise_open_files_limit(self._proc.pid, self.max_open_files)
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_listening(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        # Mosquitto listens before it installs its SIGHUP handler: a reload sent in
        # between would end it (the default action). Ready means both.
        while not (port_accepts(self.host, self.port) and _catches_sighup(self._proc.pid)):
            code = self._proc.poll()
            if code is not None:
                raise Unavailable(
                    f"mosquitto exited with status {code} while starting "
                    f"(config {self.files.conf}):\n{_tail(self.console_log)}"
                )
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"mosquitto did not accept connections on {self.host}:{self.port} "
                    f"within {self.start_timeout}s; log {self.files.log_file}:\n"
                    f"{_tail(self.files.log_file)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def reload(self, *, timeout: float = 30.0) -> None:
        """Re-read password and ACL files (SIGHUP) and wait until that happened.

        Mosquitto 2.0 then also disconnects connected clients whose
        credentials are gone, so revoking a device takes effect at once.
        The broker handles the signal between network events: one busy with a
        fleet's worth of disconnects and Wills has taken more than 5 s to get
        to it on two loaded cores, hence the generous default.
        """
        if self._proc is None or not self.running:
            raise FailedPrecondition("mosquitto is not running; start it before reloading")
        offset = _file_size(self.files.log_file)
        self._proc.send_signal(signal.SIGHUP)
        # The broker is single-threaded: once it logged the reload line it
        # finishes the reload before it reads any client's next packet.
        wait_for_log_line(self.files.log_file, _RELOAD_LINE, start_offset=offset, timeout=timeout)

    def stop(self) -> None:
        """Terminate the broker (it saves its database first); kill it after a timeout."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=self.stop_timeout)
        finally:
            if self._console is not None:
                self._console.close()
                self._console = None

    def restart(self) -> None:
        """Stop and start again on the same port (persistence survives)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MosquittoProcess({self.host}:{self.port}, pid={self.pid}, conf={self.files.conf})"


def start_private_broker(
    state_dir: Path,
    *,
    control_password: str,
    settings: BrokerSettings | None = None,
    binary: str | None = None,
    start_timeout: float = 10.0,
) -> tuple[MosquittoProcess, BrokerFiles]:
    """Write a config into `state_dir` and start a broker on it.

    `settings` defaults to `BrokerSettings()` on a free port; a port of 0 is
    replaced by a free one. Reusing a `state_dir` keeps its devices and
    persistence. The caller stops the returned process.
    """
    settings = settings or BrokerSettings(port=0)
    # A wildcard bind is reached, and probed, through loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.bind_address, settings.bind_address)
    if settings.port == 0:
        settings = dataclasses.replace(settings, port=free_port(host))
    if settings.tls_port == 0:
        settings = dataclasses.replace(settings, tls_port=free_port(host))
    files = write_broker_config(state_dir, settings, control_password=control_password)
    process = MosquittoProcess(
        files,
        host=host,
        port=settings.port,
        binary=binary,
        start_timeout=start_timeout,
        max_open_files=settings.max_open_files,
    )
    return process.start(), files
