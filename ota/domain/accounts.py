"""Which names a device may not take: those of the control plane's broker accounts.

A device's id is its broker username (its password account, or the common
name of its certificate, which the broker takes as the username). A device
named like a control-plane account would therefore overwrite that account's
password, or sign in with the control plane's rights through its
certificate. Each control plane connects as one username and derives the
names of its extra connections from it (`<user>-publish-<n>`,
`<user>-ingest-<n>`), so the whole `<user>` and `<user>-*` namespace is the
control plane's.
"""

from __future__ import annotations

from collections.abc import Iterable


def reserving_account(device_id: str, control_usernames: Iterable[str]) -> str | None:
    """The control-plane username whose namespace holds `device_id`, else None."""
    for username in control_usernames:
        if device_id == username or device_id.startswith(f"{username}-"):
            return username
    return None
