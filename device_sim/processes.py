"""`ota-sim run --processes N`: one fleet split over N processes, started together.

One Python process drives its devices from one core. Each child runs a
contiguous slice of the fleet (`--slice I/N`): it registers and builds its
devices, says `prepared`, and connects only when the parent says go, so the
connect time the parent reports is the wall time of the whole fleet, from
go until the last child's devices are all connected and subscribed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from ota.errors import InvalidArgument, OtaError

T = TypeVar("T")


class Output:
    """What `ota-sim run` prints: short text lines, or one JSON object per line (`--json`)."""

    def __init__(self, *, json_lines: bool, stream: IO[str] | None = None) -> None:
        self.json_lines = json_lines
        self.stream = stream or sys.stdout

    def event(self, name: str, **fields: Any) -> None:
        if self.json_lines:
            line = json.dumps({"event": name, **fields})
        elif name == "online":
            per_device = (fields["rss_kib"] - fields["rss_before_kib"]) / max(fields["devices"], 1)
            line = (
                f"{fields['devices']} devices online; state in {fields['state_dir']} "
                f"(connected in {fields['connect_s']:.2f} s, {per_device:.1f} KiB RSS each)"
            )
        else:
            line = f"{name}: " + "  ".join(f"{k} {v}" for k, v in fields.items())
        print(line, file=self.stream, flush=True)

    def status(
        self,
        states: Counter[str],
        misbehaving: dict[str, dict[str, int]],
        generations: Counter[int] | None = None,
        following: int = 0,
    ) -> None:
        """The last state each device reported per rollout, counted; misbehaving messages;
        how many devices hold each desired-state generation, and how many follow their
        desired-state topic (`SimDevice.following` is set) (JSON only)."""
        if self.json_lines:
            self.event(
                "status",
                time=time.time(),
                states=dict(states),
                misbehaving=misbehaving,
                generations={str(g): n for g, n in sorted((generations or {}).items())},
                following=following,
            )
            return
        line = "  ".join(f"{k} {v}" for k, v in sorted(states.items())) or "idle"
        if misbehaving["sent"] or misbehaving["refused"]:
            line += f"  misbehaving sent {misbehaving['sent']} refused {misbehaving['refused']}"
        print(line, file=self.stream, flush=True)


def rss_kib() -> int:
    """This process's resident memory, KiB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_s() -> float:
    """User and system CPU seconds this process used so far."""
    t = os.times()
    return t.user + t.system


def parse_slice(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as (I, N); empty means the whole fleet, (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise InvalidArgument(f"{text!r} is not I/N", field="slice") from exc
    if not 0 <= i < n:
        raise InvalidArgument(f"{text!r}: I must be in 0..N-1", field="slice")
    return i, n


def share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Slice `index` of `count` nearly equal contiguous slices of `items`."""
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return list(items[start : start + size + (1 if index < extra else 0)])


def run_parent(args: argparse.Namespace, state_dir: Path) -> int:
    """Start `args.processes` children on slices of the fleet; report them as one fleet."""
    n = args.processes
    base = [sys.executable, "-m", "device_sim.cli", *args.argv]
    children = [
        subprocess.Popen(
            [
                *base,
                *("--processes", "1", "--slice", f"{i}/{n}", "--hold", "--json", "--duration", "0"),
                *("--state-dir", str(state_dir)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    lines: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
    for i, child in enumerate(children):
        threading.Thread(target=_read, args=(i, child, lines), daemon=True).start()
    out = Output(json_lines=args.json)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        prepared = _collect(lines, "prepared", n, stop)
        if prepared is None:
            return 1
        if args.hold:
            out.event("prepared", devices=sum(p["devices"] for p in prepared), processes=n)
            if not sys.stdin.readline():
                return 0
        t0 = time.perf_counter()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        online = _collect(lines, "online", n, stop)
        if online is None:
            return 1
        connect_s = time.perf_counter() - t0
        out.event(
            "online",
            devices=sum(o["devices"] for o in online),
            processes=n,
            state_dir=str(state_dir),
            connect_s=round(connect_s, 4),
            provision_s=round(max(o["provision_s"] for o in online), 4),
            rss_kib=sum(o["rss_kib"] for o in online),
            rss_before_kib=sum(o["rss_before_kib"] for o in online),
            cpu_s=round(sum(o["cpu_s"] for o in online), 3),
            connect_cpu_s=round(sum(o["connect_cpu_s"] for o in online), 3),
            per_process=online,
        )
        _follow(lines, n, stop, args.duration, out)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0


def _read(i: int, child: subprocess.Popen[str], lines: queue.Queue[Any]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        try:
            lines.put((i, json.loads(line)))
        except json.JSONDecodeError:
            continue
    lines.put((i, None))


def _collect(
    lines: queue.Queue[tuple[int, dict[str, Any] | None]], event: str, n: int, stop: threading.Event
) -> list[dict[str, Any]] | None:
    """One `event` line from each of the n children, in child order; None if one ended first."""
    got: dict[int, dict[str, Any]] = {}
    while len(got) < n and not stop.is_set():
        try:
            i, line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            raise OtaError(
                f"simulator process {i} stopped before it was {event}", field="processes"
            )
        if line.get("event") == event:
            got[i] = line
    return [got[i] for i in range(n)] if len(got) == n else None


def _follow(
    lines: queue.Queue[tuple[int, dict[str, Any] | None]],
    n: int,
    stop: threading.Event,
    duration: float,
    out: Output,
) -> None:
    """Print the children's combined status every round of status lines, until stopped."""
    deadline = time.monotonic() + duration if duration else None
    latest: dict[int, dict[str, Any]] = {}
    while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
        try:
            i, line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            raise OtaError(f"simulator process {i} stopped unexpectedly", field="processes")
        if line.get("event") != "status":
            continue
        latest[i] = line
        if len(latest) == n:
            states: Counter[str] = Counter()
            sent: Counter[str] = Counter()
            refused: Counter[str] = Counter()
            generations: Counter[int] = Counter()
            following = 0
            for status in latest.values():
                states.update(status["states"])
                sent.update(status["misbehaving"]["sent"])
                refused.update(status["misbehaving"]["refused"])
                generations.update({int(g): n for g, n in status["generations"].items()})
                following += status["following"]
            out.status(
                states, {"sent": dict(sent), "refused": dict(refused)}, generations, following
            )
            latest.clear()
