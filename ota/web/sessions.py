"""Dashboard sign-in: an operator token (viewer or above) buys a server-side session.

The browser holds only a random session id in a cookie (HttpOnly, SameSite=Strict,
Secure over TLS); the token stays in this process's memory and is checked again
at least every `RECHECK_SECONDS`, so a revoked API token ends its sessions too.
Sessions live in memory: a restart signs everybody out, which is acceptable for
a read-only page.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass

from ota.api.auth import OPERATORS, Authenticator, Caller
from ota.errors import OtaError

COOKIE = "ota_session"
SESSION_SECONDS = 12 * 3600
RECHECK_SECONDS = 30.0


@dataclass
class WebSession:
    caller: Caller
    token: str
    expires: float  # monotonic
    checked: float  # monotonic time the token was last found valid


class SignInRefused(Exception):
    """The token is missing, unknown, revoked, or a device's."""


class Sessions:
    def __init__(self, auth: Authenticator) -> None:
        self._auth = auth
        self._lock = threading.Lock()
        self._sessions: dict[str, WebSession] = {}

    def sign_in(self, token: str) -> tuple[str, Caller]:
        """A new session id for a valid operator token."""
        caller = self._check(token)
        sid = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self._lock:
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[sid] = WebSession(caller, token, now + SESSION_SECONDS, now)
        return sid, caller

    def caller(self, sid: str | None) -> Caller | None:
        """Who holds this session, or None (unknown, expired, or its token revoked)."""
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
        now = time.monotonic()
        if session is None or session.expires <= now:
            self.sign_out(sid)
            return None
        if now - session.checked >= RECHECK_SECONDS:
            try:
                session.caller = self._check(session.token)
            except SignInRefused:
                self.sign_out(sid)
                return None
            session.checked = now
        return session.caller

    def __len__(self) -> int:
        now = time.monotonic()
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.expires > now)

    def sign_out(self, sid: str | None) -> None:
        if sid:
            with self._lock:
                self._sessions.pop(sid, None)

    def _check(self, token: str) -> Caller:
        token = token.strip()
        if not token or token.startswith("device:"):
            raise SignInRefused("not an operator token")
        try:
            caller = self._auth.authenticate(token)
        except OtaError as exc:
            raise SignInRefused(str(exc)) from exc
        if caller.role not in OPERATORS:
            raise SignInRefused("not an operator token")
        return caller
