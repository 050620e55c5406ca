"""The control plane's trust: the TUF image repository it keeps and the director.

repository  accept release-signed targets, publish snapshot and timestamp
served      metadata as devices fetch it, from memory
freshness   re-sign the timestamp on a schedule
director    DSSE-signed desired states (devices verify with `ota.device.envelope`)
device_ca   the device CA: signs device certificates and CRLs, recognises peers
enroll      a device's key pair, enrollment and certificate renewal

Offline signing (keys, root generation, release) is `ota.signing`; what a
device does is `ota.device`, which imports nothing from here.
"""

from ota.trust.director import Director
from ota.trust.freshness import TimestampRefresher
from ota.trust.repository import AcceptedTarget, ImageRepository, MetadataStore

__all__ = [
    "AcceptedTarget",
    "Director",
    "ImageRepository",
    "MetadataStore",
    "TimestampRefresher",
]
