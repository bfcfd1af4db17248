"""CSRF protection for the dashboard's POST forms: a cookie, and a token derived from it.

Each browser gets a random cookie (``SameSite=Strict``, ``HttpOnly``); every
form carries ``HMAC(secret, cookie)``.  A POST is accepted only when both
are present and agree.  Another site can make a browser send the cookie
(not with ``SameSite=Strict``, but older browsers) yet cannot read a page to
learn the token; and without the secret it cannot mint a token for a cookie
it planted itself.  The secret is random per ``Dashboard`` unless given, so
several processes serving one dashboard need the same ``secret=``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

COOKIE = "mqueue_csrf"
FIELD = "csrf_token"
_COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


class Csrf:
    """Issues cookies and checks tokens with one secret."""

    def __init__(self, secret: bytes | str | None = None) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self.secret = secret or secrets.token_bytes(32)

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    @staticmethod
    def usable(cookie: str | None) -> bool:
        """A cookie we could have issued (anything else is replaced)."""
        return cookie is not None and _COOKIE_VALUE.match(cookie) is not None

    def token(self, cookie: str) -> str:
        return hmac.new(self.secret, cookie.encode(), hashlib.sha256).hexdigest()

    def valid(self, cookie: str | None, token: str | None) -> bool:
        """Whether a POST's cookie and form token belong together."""
        if not self.usable(cookie) or not token:
            return False
        return hmac.compare_digest(self.token(cookie), token)

    @staticmethod
    def set_cookie_header(cookie: str, path: str) -> tuple[str, str]:
        return "Set-Cookie", f"{COOKIE}={cookie}; Path={path or '/'}; HttpOnly; SameSite=Strict"
