"""What a scenario makes devices do besides their honest work: churn and misbehaviour.

Churn takes devices offline the way firmware shutting down does and brings
them back. A misbehaving device keeps running its honest firmware and, on the
same MQTT session and credentials, also sends what `device_sim.scenario.
MISBEHAVIOURS` lists: what a compromised or broken device could send. What
the broker refused is counted here, in `Misbehaving.refused`; what reaches
the control plane is its to drop and count.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

from device_sim.device import SimDevice
from device_sim.mqtt import MqttError
from device_sim.scenario import ChurnRule, Misbehaviour
from ota.transport.topics import Topics
from ota.v1 import common_pb2

log = logging.getLogger(__name__)

# Over the control plane's 64 KiB event limit, under the broker's 256 KiB packet limit.
OVERSIZED_BYTES = 96 * 1024


class Misbehaving:
    """Runs one scenario misbehaviour on some devices; counts what was sent and refused."""

    def __init__(self, rule: Misbehaviour, topics: Topics, rng: random.Random) -> None:
        self.rule = rule
        self.topics = topics
        self.rng = rng
        self.sent: Counter[str] = Counter()  # kind -> messages the broker took
        self.refused: Counter[str] = Counter()  # kind -> messages the broker refused

    async def run(self, device: SimDevice, victim: str) -> None:
        """Send the rule's messages through `device`'s session; `victim` is another device."""
        await device.connected.wait()
        if self.rule.after:
            await asyncio.sleep(self.rule.after)
        kind = self.rule.kind
        replay: list[bytes] = []
        for i in range(self.rule.messages):
            connection = device.connection
            if connection is None:
                return
            topic = self.topics.events(device.device_id)
            if kind == "garbage":
                payload = self.rng.randbytes(self.rng.randint(1, 512))
                # A stray valid-looking first byte must not make it parse by luck.
                payload = b"\xff" + payload
            elif kind == "oversized":
                payload = _event(device, device.sequence.next(), detail="x" * OVERSIZED_BYTES)
            elif kind == "flood":
                payload = _event(device, device.sequence.next(), rollout_id=f"flood-{i}")
            elif kind == "impersonate":
                payload = _event(device, device.sequence.next(), device_id=victim)
            elif kind == "foreign_topic":
                topic = self.topics.events(victim)
                payload = _event(device, device.sequence.next(), device_id=victim)
            else:  # replay: the same event, same seq, again and again
                if not replay:
                    replay.append(_event(device, device.sequence.next()))
                payload = replay[0]
            try:
                accepted = await connection.publish(topic, payload, qos=1)
            except MqttError:
                return  # its session went; the misbehaviour ends with it
            (self.sent if accepted else self.refused)[kind] += 1


def _event(
    device: SimDevice, seq: int, *, rollout_id: str = "", device_id: str = "", detail: str = ""
) -> bytes:
    event = common_pb2.DeviceEvent(
        device_id=device_id or device.device_id,
        seq=seq,
        rollout_id=rollout_id,
        state=common_pb2.DeviceState.Value("NOTIFIED" if rollout_id else "ACTIVE"),
        detail=detail,
    )
    event.time.GetCurrentTime()
    if not rollout_id:
        event.health.uptime_seconds = 1  # a periodic sample, as honest firmware sends
    return event.SerializeToString()


async def churn(
    rule: ChurnRule,
    device_ids: list[str],
    leave: Callable[[str], Awaitable[None]],
    back: Callable[[str], Awaitable[None]],
) -> None:
    """Take `device_ids` offline after `rule.after` s and back `rule.offline` s later; repeat."""
    await asyncio.sleep(rule.after)
    while True:
        log.info("churn: %d devices go offline for %.0f s", len(device_ids), rule.offline)
        await asyncio.gather(*(leave(d) for d in device_ids))
        await asyncio.sleep(rule.offline)
        await asyncio.gather(*(back(d) for d in device_ids))
        if not rule.every:
            return
        await asyncio.sleep(max(rule.every - rule.offline, 0.0))
