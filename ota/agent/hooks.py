"""Running the device team's hooks: fixed arguments and environment, a timeout, bounded output.

A hook is any executable. The agent runs it as

    HOOK FEATURE VERSION BUNDLE

with the environment of the agent plus the ``OTA_*`` variables of `HookCall`,
in a process group of its own, with stdin from /dev/null. Exit status 0 means
done; anything else, a signal, the timeout, more output than the limit, a
missing file or one that cannot be executed means failed, with a one-line
reason and the tail of its output in `HookResult.detail`. The hook's whole
process group is killed when it times out or floods, and when it exits, so no
helper it started outlives it. Nothing a hook does can raise out of `run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ota.agent.config import HookSettings

log = logging.getLogger(__name__)

TAIL_BYTES = 2048  # of the output kept for the log and the event's detail
DETAIL_CHARS = 480  # the event's detail (the control plane keeps 500)
_DRAIN_AFTER_EXIT = 1.0  # seconds to read what is left once the hook has exited


@dataclass(frozen=True)
class HookCall:
    """What a hook is told; each field is also an environment variable (in brackets)."""

    feature: str  # OTA_FEATURE
    version: str  # OTA_VERSION: the version this call is about
    bundle: Path | None = None  # OTA_BUNDLE: the verified bundle file (read it, don't move it)
    sha256: str = ""  # OTA_SHA256: its digest, hex
    previous_version: str = ""  # OTA_PREVIOUS_VERSION: what ran before ("" for none)
    rollout_id: str = ""  # OTA_ROLLOUT_ID

    def environment(self, hook: str) -> dict[str, str]:
        return {
            "OTA_HOOK": hook,
            "OTA_FEATURE": self.feature,
            "OTA_VERSION": self.version,
            "OTA_BUNDLE": str(self.bundle) if self.bundle is not None else "",
            "OTA_SHA256": self.sha256,
            "OTA_PREVIOUS_VERSION": self.previous_version,
            "OTA_ROLLOUT_ID": self.rollout_id,
        }


@dataclass(frozen=True)
class HookResult:
    ok: bool
    reason: str  # one line: "exited 3", "timed out after 30s", ...
    output: bytes = b""  # the tail of stdout and stderr, interleaved as read
    stdout: bytes = b""  # the head of stdout (what a health hook reports), bounded

    @property
    def detail(self) -> str:
        tail = self.output.decode("utf-8", "replace").strip()
        text = f"{self.reason}: {tail}" if tail else self.reason
        return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


class Hooks:
    """The configured hooks of one device; `base_env` goes to every hook (device id, model…)."""

    def __init__(self, settings: HookSettings, base_env: Mapping[str, str]) -> None:
        self._settings = settings
        self._base_env = dict(base_env)

    def configured(self, name: str) -> bool:
        return self._settings.paths.get(name) is not None

    def run(self, name: str, call: HookCall) -> HookResult:
        """Run hook `name`; an unconfigured hook succeeds at once (nothing to do)."""
        path = self._settings.paths.get(name)
        if path is None:
            return HookResult(True, "not configured")
        env = {**os.environ, **self._base_env, **call.environment(name)}
        argv = [str(path), call.feature, call.version, str(call.bundle or "")]
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd="/",
                process_group=0,  # its own group: a timeout kills what it started too
            )
        except FileNotFoundError:
            return self._done(name, call, HookResult(False, f"{name} hook {path} does not exist"))
        except PermissionError:
            return self._done(
                name, call, HookResult(False, f"{name} hook {path} is not executable")
            )
        except OSError as exc:
            return self._done(
                name, call, HookResult(False, f"{name} hook {path} cannot run: {exc.strerror}")
            )
        result = self._supervise(name, proc)
        log.debug(
            "%s hook for %s %s took %.2fs",
            name,
            call.feature,
            call.version,
            time.monotonic() - started,
        )
        return self._done(name, call, result)

    def _supervise(self, name: str, proc: subprocess.Popen[bytes]) -> HookResult:
        timeout = self._settings.timeout_seconds
        limit = self._settings.output_limit_bytes
        deadline = time.monotonic() + timeout
        tail = bytearray()
        head = bytearray()
        total = 0
        failure = ""
        assert proc.stdout is not None and proc.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        try:
            while sel.get_map():
                now = time.monotonic()
                if proc.poll() is not None:
                    # Exited; a helper it left behind may hold the pipes: read briefly.
                    deadline = min(deadline, now + _DRAIN_AFTER_EXIT)
                if now >= deadline:
                    if proc.poll() is None:
                        failure = f"{name} hook timed out after {timeout:g}s"
                    break
                for key, _ in sel.select(timeout=min(0.5, deadline - now)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    total += len(chunk)
                    if key.fileobj is proc.stdout and len(head) < TAIL_BYTES * 8:
                        head += chunk[: TAIL_BYTES * 8 - len(head)]
                    tail += chunk
                    del tail[:-TAIL_BYTES]
                if total > limit:
                    failure = f"{name} hook wrote more than {limit} bytes of output"
                    break
        finally:
            sel.close()
            _kill_group(proc.pid)
            code = _reap(proc)
            proc.stdout.close()
            proc.stderr.close()
        if failure:
            return HookResult(False, failure, bytes(tail), bytes(head))
        if code is None:
            return HookResult(False, f"{name} hook did not exit", bytes(tail), bytes(head))
        if code < 0:
            reason = f"{name} hook killed by signal {signal.Signals(-code).name}"
            return HookResult(False, reason, bytes(tail), bytes(head))
        if code != 0:
            return HookResult(False, f"{name} hook exited {code}", bytes(tail), bytes(head))
        return HookResult(True, "ok", bytes(tail), bytes(head))

    def _done(self, name: str, call: HookCall, result: HookResult) -> HookResult:
        if result.ok:
            # Health runs every interval: only the hooks that change something are news.
            level = logging.DEBUG if name == "health" else logging.INFO
            log.log(level, "%s hook: %s %s done", name, call.feature, call.version)
        else:
            log.warning(
                "%s hook: %s %s failed: %s", name, call.feature, call.version, result.detail
            )
        return result


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(pgid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[bytes]) -> int | None:
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None
