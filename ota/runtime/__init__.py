"""The control plane's long-running loops: one `Worker` shape, woken by named `Signals`."""

from ota.runtime.signals import Signal, Signals
from ota.runtime.worker import Backoff, Worker

__all__ = ["Backoff", "Signal", "Signals", "Worker"]
