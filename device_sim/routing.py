"""Whether the broker delivered a device's publish to anyone: the PUBACK's reason code.

MQTT 5 lets a broker answer a QoS 1 publish with 0x10, "no matching
subscribers": accepted, but delivered to nobody. Mosquitto 2.0 answers so for
device events right after it restarts, because it routes nothing to a
persistent session restored from its database until that client reconnects;
the control plane's ingest session is such a session. A device that takes
0x10 for a delivery loses the event, so it keeps it and sends it again.

aiomqtt does not surface the reason code; `Routing` wraps the paho client
under one aiomqtt client to read it, per asyncio task.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

NO_MATCHING_SUBSCRIBERS = 0x10

# The message id of the last publish the current asyncio task made.
_last_mid: ContextVar[int] = ContextVar("device_sim_last_mid", default=-1)


class Routing:
    """Tracks which publishes of one aiomqtt client the broker delivered to nobody."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._unrouted: set[int] = set()
        inner: paho.Client = client._client
        publish, on_publish = inner.publish, inner.on_publish

        def tracked_publish(*args: Any, **kwargs: Any) -> paho.MQTTMessageInfo:
            info = publish(*args, **kwargs)
            self._unrouted.discard(info.mid)  # message ids are reused
            _last_mid.set(info.mid)
            return info

        def tracked_on_publish(*args: Any) -> None:
            _client, _userdata, mid, reason, _props = args
            if getattr(reason, "value", 0) == NO_MATCHING_SUBSCRIBERS:
                self._unrouted.add(mid)
            if on_publish is not None:
                on_publish(*args)

        inner.publish = tracked_publish  # type: ignore[method-assign]
        inner.on_publish = tracked_on_publish

    def delivered(self) -> bool:
        """Whether this task's last publish, once acknowledged, reached a subscriber."""
        mid = _last_mid.get()
        if mid in self._unrouted:
            self._unrouted.discard(mid)
            return False
        return True
