"""`ota rollout watch`: live progress from WatchRollout, one line per change."""

from __future__ import annotations

from google.protobuf.json_format import MessageToJson
from rich.console import Console

from ota.client import Client
from ota.v1 import rollout_pb2


def _state(value: int) -> str:
    return rollout_pb2.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_")  # type: ignore[arg-type]


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // total if total else 0
    return "█" * filled + "·" * (width - filled)


def watch_rollout(
    client: Client, rollout_id: str, *, json_lines: bool = False, console: Console | None = None
) -> str:
    """Print transitions and progress until the rollout ends; returns its final state."""
    console = console or Console()
    final = ""
    stream = client.rollouts.WatchRollout(
        rollout_pb2.GetRolloutRequest(rollout_id=rollout_id), metadata=client.metadata
    )
    for update in stream:
        r = update.rollout
        final = _state(r.state)
        if json_lines:
            print(MessageToJson(update, indent=None, preserving_proto_field_name=True))
            continue
        for e in update.events:
            console.print(
                f"[bold]{e.time.ToDatetime().strftime('%H:%M:%S')}[/bold] {e.actor:<8} "
                f"{e.action:<9} {_state(e.to_state):<11} {e.reason}"
            )
        active = r.device_states.get("ACTIVE", 0)
        failed = r.device_states.get("FAILED", 0)
        console.print(
            f"   {_bar(active, r.eligible)} active {active}/{r.eligible}  "
            f"exposed {r.exposed}  failed {failed}  [{final}]",
            style="dim",
        )
    return final
