"""`ota rollout watch`: live progress, drawn from the same report `ota report` prints.

WatchRollout says *when* something changed (a transition, devices moving);
each change is then shown from the adoption report (`GetRolloutReport`), so
the live view and the report cannot disagree: the per-stage bars are the
report's stage funnels.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from rich.console import Console

from ota.cli.output import plain
from ota.client import Client
from ota.errors import OtaError
from ota.reports.figures import rollout_state
from ota.v1 import report_pb2, rollout_pb2

# At most one report per this many seconds while devices stream in.
REFRESH_SECONDS = 1.0


def bar(done: int, total: int, width: int = 24) -> str:
    filled = min(width, width * done // total) if total else 0
    return "█" * filled + "·" * (width - filled)


def progress_lines(report: report_pb2.RolloutReport) -> list[str]:
    """One line per stage that exposed devices, from the report's stage funnels."""
    lines: list[str] = []
    for sf in report.stage_funnels:
        steps = {s.step: s.devices for s in sf.steps}
        exposed = steps.get("TARGETED", 0)
        if not exposed:
            continue
        active = steps.get("ACTIVE", 0)
        lines.append(
            f"   stage {sf.stage + 1} {sf.ppm / 10_000:>6g}%  {bar(active, exposed)} "
            f"active {active}/{exposed}  installed {steps.get('INSTALLED', 0)}  "
            f"used {steps.get('USED', 0)}"
        )
    failed = sum(c.count for c in report.failures_by_reason)
    active = next((s.devices for s in report.funnel if s.step == "ACTIVE"), 0)
    lines.append(
        f"   total  {bar(active, report.eligible - report.exposure_gap.holdout)} "
        f"exposed {report.exposed}/{report.eligible - report.exposure_gap.holdout} eligible"
        + (f" (holdout {report.exposure_gap.holdout})" if report.exposure_gap.holdout else "")
        + f"  failed {failed}  "
        f"unreachable {report.stragglers.unreachable}  [{rollout_state(report.rollout.state)}]"
    )
    return lines


# Answers that mean the control plane went away (a restart, an outage), not that the
# watch is wrong: reconnect. Anything else (not found, not allowed) ends the watch.
RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
DEFAULT_RECONNECT_FOR = 300.0
FINAL_STATES = (
    rollout_pb2.ROLLOUT_STATE_COMPLETED,
    rollout_pb2.ROLLOUT_STATE_ABORTED,
    rollout_pb2.ROLLOUT_STATE_ROLLED_BACK,
    rollout_pb2.ROLLOUT_STATE_KILLED,
)


class WatchLost(OtaError):
    """The control plane stayed out of reach for longer than the watch was told to wait."""


@dataclass
class Reconnect:
    """When to try the control plane again, and when to stop trying.

    Jittered exponential pauses (0.5 s doubling up to 5 s), for at most
    `give_up_after` seconds since the watch last heard from the server.
    """

    give_up_after: float
    first_delay: float = 0.5
    max_delay: float = 5.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _lost_at: float | None = None
    _failures: int = 0

    @property
    def tries(self) -> int:
        """Reconnections tried since the server was last heard from."""
        return self._failures

    @property
    def lost(self) -> bool:
        return self._lost_at is not None

    def heard(self) -> None:
        """The server answered: any outage is over."""
        self._lost_at = None
        self._failures = 0

    def next_pause(self) -> float | None:
        """The pause before the next try, or None: waited long enough, give up."""
        now = self.clock()
        if self._lost_at is None:
            self._lost_at = now
        left = self._lost_at + self.give_up_after - now
        if left <= 0:
            return None
        self._failures += 1
        ceiling = min(self.max_delay, self.first_delay * 2.0 ** min(self._failures - 1, 30))
        return min(ceiling * (0.5 + 0.5 * self.rng.random()), left)


def watch_rollout(
    client: Client,
    rollout_id: str,
    *,
    json_lines: bool = False,
    console: Console | None = None,
    reconnect_for: float = DEFAULT_RECONNECT_FOR,
    server: str = "",
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Print transitions and progress until the rollout ends; returns its final state.

    A control plane that goes away (restarted, upgraded, down for a while) is
    reconnected to, with backoff, for up to `reconnect_for` seconds; the watch
    resumes from the rollout as it is then, without repeating what it printed.
    Giving up raises `WatchLost`.
    """
    console = console or Console()
    view = _View(client, rollout_id, json_lines=json_lines, console=console)
    reconnect = Reconnect(reconnect_for)
    while True:
        try:
            stream = client.rollouts.WatchRollout(
                rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
            )
            for update in stream:
                if reconnect.lost:
                    print("reconnected to the control plane; watching again", file=sys.stderr)
                reconnect.heard()
                if view.show(update):
                    return view.final
            if view.ended:
                return view.final
            # The stream ended with the rollout still going (a server shutting down):
            # treat it as a lost connection.
            reason = "the server closed the watch"
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in RECONNECT_CODES or not view.heard:
                # Never reached at all: a wrong address is likelier than a restart.
                raise
            reason = f"{code.name}: {exc.details()}"
        pause = reconnect.next_pause()
        if pause is None:
            raise WatchLost(
                f"lost the control plane{f' at {server}' if server else ''} and could not "
                f"reconnect for {_seconds(reconnect_for)} ({reason}); the rollout goes on "
                "without this watch: `ota rollout watch` again, or raise --reconnect-for"
            )
        if reconnect.tries == 1:  # once per outage
            print(
                f"lost the control plane ({reason}); reconnecting for up to "
                f"{_seconds(reconnect_for)}",
                file=sys.stderr,
                flush=True,
            )
        sleep(pause)


def _seconds(value: float) -> str:
    whole = int(value)
    if whole % 60 == 0 and whole >= 60:
        return f"{whole // 60}m"
    return f"{value:g}s"


class _View:
    """What the watch printed so far: each audit entry once, across reconnections."""

    def __init__(
        self, client: Client, rollout_id: str, *, json_lines: bool, console: Console
    ) -> None:
        self._client = client
        self._rollout_id = rollout_id
        self._json = json_lines
        self._console = console
        self._last_event = 0
        self._shown = 0.0
        self.final = ""
        self.ended = False
        self.heard = False  # any update received yet

    def show(self, update: rollout_pb2.RolloutUpdate) -> bool:
        """Print one update; True once the rollout has ended."""
        self.heard = True
        self.final = rollout_state(update.rollout.state)
        self.ended = update.rollout.state in FINAL_STATES
        # A new stream starts with the whole audit log: print only what is new.
        fresh = [e for e in update.events if e.id > self._last_event]
        self._last_event = max([self._last_event, *(e.id for e in update.events)])
        if self._json:
            del update.events[:]
            update.events.extend(fresh)
            # JSON lines: one RolloutUpdate per line, in the convention of `--format json`.
            print(json.dumps(plain(update), sort_keys=True), flush=True)
            return self.ended
        for e in fresh:
            self._console.print(
                f"[bold]{e.time.ToDatetime().strftime('%H:%M:%S')}[/bold] {e.actor:<8} "
                f"{e.action:<9} {rollout_state(e.to_state):<11} {e.reason}"
            )
        if fresh or self.ended or time.monotonic() - self._shown >= REFRESH_SECONDS:
            report = self._client.reports.GetRolloutReport(
                report_pb2.GetRolloutReportRequest(rollout_id=self._rollout_id),
                metadata=self._client.metadata,
            )
            self._shown = time.monotonic()
            for line in progress_lines(report):
                self._console.print(line, style="dim")
        return self.ended
