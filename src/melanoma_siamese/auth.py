"""A bearer token for a server reachable from other machines: its thumbnails are patients' training images.

Every route but the health check needs `Authorization: Bearer TOKEN`. A browser cannot add that header to
the page it opens, so `/?token=TOKEN` answers the page and sets the same token as an HttpOnly cookie, which
the page's own requests then carry.
"""
from __future__ import annotations

import hmac
import ipaddress
from http.cookies import SimpleCookie
from typing import Optional
from urllib.parse import parse_qs

COOKIE = "melanoma_siamese_token"
TOKEN_ENV = "MELANOMA_SIAMESE_TOKEN"
OPEN_PATHS = ("/api/health",)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _presented(scope) -> tuple[Optional[str], bool]:
    """(token the request carries, whether it came in the query string)."""
    headers = dict(scope.get("headers", []))
    authorization = headers.get(b"authorization", b"").decode("latin-1")
    if authorization.lower().startswith("bearer "):
        return authorization[7:].strip(), False
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed cookie header is no token, not a server error
        cookie = SimpleCookie()
    if COOKIE in cookie:
        return cookie[COOKIE].value, False
    if scope.get("path") == "/":
        values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if values:
            return values[0], True
    return None, False


class BearerToken:
    """ASGI middleware: 401 without the token on every path but OPEN_PATHS."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        token, from_query = _presented(scope)
        if token is None or not hmac.compare_digest(token.encode(), self.token):
            from fastapi.responses import JSONResponse

            response = JSONResponse({"detail": "this server needs its token: send 'Authorization: Bearer TOKEN', "
                                               "or open the page as /?token=TOKEN"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        if not from_query:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (b"set-cookie", f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/".encode())]
            await send(message)

        await self.app(scope, receive, send_with_cookie)
