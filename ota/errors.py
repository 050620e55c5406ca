"""Errors of ota, one tree, each carrying what a user needs to act.

    OtaError
    ├── InvalidArgument        a caller's input is wrong (names the field)
    ├── NotFound               a named resource does not exist
    ├── AlreadyExists          a create collided with an existing resource
    ├── FailedPrecondition     the resource is not in a state that allows this
    ├── Aborted                a concurrent change won (stale etag, version race)
    ├── PermissionDenied / Unauthenticated
    ├── Unavailable            retryable trouble with the store or the broker
    └── VerificationError      a device refuses what it was given (carries a FailureReason)

The gRPC layer maps each to one status code (`ota.api.errors`); the CLI prints
the message on one line. Foreign exceptions are translated once, at the
boundary where they occur, with ``raise ... from exc``.
"""

from __future__ import annotations


class OtaError(Exception):
    """Root of every error ota raises on purpose."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(OtaError):
    """The caller's input is wrong; `field` names which part."""


class NotFound(OtaError):
    """A named resource does not exist."""


class AlreadyExists(OtaError):
    """A create collided with an existing resource."""


class FailedPrecondition(OtaError):
    """The resource's current state does not allow the operation."""


class Aborted(OtaError):
    """A concurrent change won; re-read and retry."""


class Unauthenticated(OtaError):
    """No valid credentials were presented."""


class PermissionDenied(OtaError):
    """The credentials are valid but do not allow this."""


class Unavailable(OtaError):
    """Retryable trouble with a dependency (database, broker)."""


class VerificationError(OtaError):
    """A device refuses an update; `reason` is the FailureReason name reported."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
