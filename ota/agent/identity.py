"""The agent's certificate: enrolled once, on the first start, and kept in its state directory.

The key is made here (`ota.device.enroll`) and never leaves the device; it
is written with mode 0600 in a directory only the agent's user can enter. A
certificate on disk, whether enrolled earlier or put there at the factory
(`ota fleet sign-csr`), is used as it is: the enrollment token is spent on
first use, so a restart must never ask again. Renewal happens while the agent
runs (`Agent`), over the mutual-TLS channel of the current certificate.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc

from ota.agent.config import AgentConfig
from ota.device.enroll import Identity, enroll
from ota.errors import InvalidArgument
from ota.tls import ClientTls, channel

log = logging.getLogger(__name__)

# A control plane that is away (restarting, not reachable yet at first boot) is
# waited for; anything else is a refusal a retry cannot change.
_WAIT_OUT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
FIRST_DELAY, MAX_DELAY = 1.0, 60.0


class EnrollmentStopped(Exception):
    """A stop was asked for while the agent was waiting to enroll."""


_FILES = ("key.pem", "cert.pem", "device-ca.pem")


def has_identity(config: AgentConfig) -> bool:
    _recover(config.identity_dir)
    return _complete(config.identity_dir)


def load_or_enroll(config: AgentConfig, *, pause: Callable[[float], bool]) -> Identity:
    """The certificate on disk, or a new one for the enrollment token.

    `pause(seconds)` waits between attempts and returns True when the agent is
    asked to stop meanwhile (then `EnrollmentStopped`).
    """
    if has_identity(config):
        return Identity.load(config.identity_dir, config.device_id)
    if not config.enrollment_token:
        raise InvalidArgument(
            f"no certificate in {config.identity_dir} yet and no enrollment token to get one",
            field="enrollment_token",
        )
    tls = config.grpc_tls
    assert tls is not None  # a certificate device always speaks TLS to the control plane
    enrolling = channel(config.server, ClientTls(tls.ca_file, None, None))
    delay = FIRST_DELAY
    try:
        while True:
            try:
                identity = enroll(enrolling, config.device_id, config.enrollment_token)
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in _WAIT_OUT:
                    raise InvalidArgument(
                        f"enrollment refused ({code.name}: {exc.details()}); "
                        "`ota fleet register` the device again for a new token",
                        field="enrollment_token",
                    ) from exc
                log.warning("cannot enroll yet (%s); trying again in %.0f s", code.name, delay)
                if pause(delay):
                    raise EnrollmentStopped() from exc
                delay = min(delay * 2, MAX_DELAY)
    finally:
        enrolling.close()
    save(config, identity)
    log.info("enrolled: certificate %s, renewal due %s", identity.serial, identity.renew_at())
    return identity


def save(config: AgentConfig, identity: Identity) -> None:
    """Replace the identity on disk as a whole, durably.

    Key and certificate must match: a power cut between writing one and the
    other would leave a device whose new certificate the control plane already
    recorded and whose key does not fit it. So the new pair goes into a
    directory of its own, flushed, and the directories are swapped by rename;
    `_recover` finishes a swap a power cut interrupted.
    """
    directory = config.identity_dir
    fresh, old = _beside(directory, "new"), _beside(directory, "old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(mode=0o700, parents=True)
    identity.save(fresh)
    for name in _FILES:
        _fsync(fresh / name)
    _fsync(fresh)
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    fresh.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover(directory: Path) -> None:
    """After a power cut inside `save`: a complete new identity wins (the control plane
    has recorded it, so the old one is refused already); else the old one stays."""
    fresh, old = _beside(directory, "new"), _beside(directory, "old")
    for candidate in (fresh, old):
        if candidate.exists() and (candidate is fresh or not directory.exists()):
            if _complete(candidate):
                shutil.rmtree(directory, ignore_errors=True)
                candidate.rename(directory)
                _fsync(directory.parent)
                log.info("finished replacing the certificate cut short by the last power loss")
            else:
                shutil.rmtree(candidate)
    shutil.rmtree(old, ignore_errors=True)


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def _beside(directory: Path, suffix: str) -> Path:
    return directory.with_name(f"{directory.name}.{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
