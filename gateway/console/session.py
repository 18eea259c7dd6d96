"""The console's session cookie and CSRF tokens: signed, never holding the admin key.

A session is ``who.expiry.nonce`` signed with HMAC-SHA256. The signing secret derives from the
admin credential when there is one, so every worker of ``--workers N`` accepts the same cookie
and rotating the admin key ends every session; without it the secret is this process's own.
A form's CSRF token is bound to its session's nonce, so a page from another session cannot post.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

COOKIE = "dg_console"
LOGIN_COOKIE = "dg_console_login"
"""The login form's double-submit token: there is no session yet to bind its CSRF token to."""
SESSION_TTL_S = 12 * 3600.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Session:
    """Who logged in (``admin`` or ``key:<id>``), until when, and the nonce its CSRF token is bound to."""

    subject: str
    expires_at: float
    nonce: str


class Sessions:
    """Issues and checks session cookies and their CSRF tokens."""

    def __init__(self, admin_key: str | None, *, ttl_s: float = SESSION_TTL_S) -> None:
        seed = admin_key.encode() if admin_key else secrets.token_bytes(32)
        self._secret = hmac.new(seed, b"distillgate console sessions", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._secret, text.encode(), hashlib.sha256).digest())

    def issue(self, subject: str, now: float | None = None) -> str:
        """A new session's cookie value."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        body = f"{subject}.{expires}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self._sign(body)}"

    def read(self, value: str | None, now: float | None = None) -> Session | None:
        """The session a cookie value names, or ``None`` when it is absent, forged or expired."""
        if not value or value.count(".") != 3:
            return None
        body, _, signature = value.rpartition(".")
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        subject, expires, nonce = body.split(".")
        if not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return None
        return Session(subject, float(expires), nonce)

    def csrf(self, session: Session) -> str:
        """The token every form of ``session`` carries."""
        return self._sign(f"csrf|{session.nonce}")

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf(session))


def login_token() -> str:
    """A fresh double-submit token for the login form."""
    return secrets.token_urlsafe(24)
