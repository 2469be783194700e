"""The dashboard's guard: the access token, cross-site and Host checks, read-only mode, safe headers."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.datastructures import FormData
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp

SESSION_COOKIE = "stepline_ui"
CSRF_FIELD = "csrf"
PUBLIC_PATHS = frozenset({"/login", "/livez", "/readyz"})
"""Answered without the token: the login form and the health checks (they show nothing)."""
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
"""The Host names a dashboard bound to loopback answers to, besides the address it is bound to."""

# Pages load only the dashboard's own script and style sheet: an injected <script> could not run
# even if a value escaped its escaping; no page may be framed (clickjacking on the action buttons).
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class RefusedError(Exception):
    """A POST the guard refuses: ``status`` and the reason shown to the user."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Guard:
    """What every request must show: the token's cookie (when a token is set), and for POSTs the CSRF token.

    The CSRF token is random per process (every form carries it); a cross-site
    page cannot read it, and a browser's ``Origin`` naming another site is
    refused on its own. The session cookie holds a digest of the token, never
    the token itself: HttpOnly, SameSite=Strict.
    """

    def __init__(self, token: str | None, *, read_only: bool, bind_host: str = "127.0.0.1") -> None:
        self._token = token
        self.read_only = read_only
        self.csrf_token = secrets.token_urlsafe(32)
        self.allowed_hosts = allowed_hosts(bind_host)

    def is_allowed_host(self, request: Request) -> bool:
        """Whether the request's ``Host`` header names this dashboard (always, when not bound to loopback).

        A page on another site can make a browser resolve its own name to
        127.0.0.1 (DNS rebinding) and read a loopback dashboard as same-origin;
        such a request still carries that site's name in ``Host``.
        """
        if self.allowed_hosts is None:
            return True
        return host_name(request.headers.get("host", "")) in self.allowed_hosts

    @property
    def needs_login(self) -> bool:
        """Whether a token is set, so that every request must carry it."""
        return self._token is not None

    def session_value(self) -> str:
        """The cookie a login sets (a digest of the token; empty without a token)."""
        if self._token is None:
            return ""
        return hmac.new(self._token.encode(), b"stepline-ui-session", hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the token (compared in constant time)."""
        return self._token is not None and hmac.compare_digest(given.encode(), self._token.encode())

    def is_signed_in(self, request: Request) -> bool:
        """Whether the request carries the session cookie, or the token as a bearer header."""
        if self._token is None:
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), self.session_value().encode()):
            return True
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and self.token_matches(header.removeprefix("Bearer ").strip())

    async def action_form(self, request: Request) -> FormData:
        """The form of an action POST, once it passed every check.

        Raises:
            RefusedError: read-only mode (403), or a missing or wrong CSRF token (403).
        """
        if self.read_only:
            raise RefusedError(403, "the dashboard is read-only (stepline ui --read-only): actions are off")
        form = await request.form()
        given = form.get(CSRF_FIELD)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.csrf_token.encode()):
            raise RefusedError(
                403, "the form's CSRF token is missing or stale: reload the page and try again"
            )
        return form


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, brackets allowed) is this machine's loopback."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str) -> frozenset[str] | None:
    """The ``Host`` names a dashboard bound to ``bind_host`` answers, or None (any) when not on loopback.

    Bound to loopback only a browser on this machine reaches it, under one of
    the loopback names or the bound address; a wider binding is guarded by
    the token instead, and its names are the operator's to choose.
    """
    if not is_loopback(bind_host):
        return None
    return LOOPBACK_NAMES | {bind_host.strip("[]").lower()}


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port or an IPv6 address's brackets, lower-case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.partition(":")[0]


def is_cross_site(request: Request) -> bool:
    """Whether the browser says the request comes from another site (``Origin``, ``Referer``, Sec-Fetch)."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return True
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    origin = request.headers.get("origin")
    if origin is not None:
        return origin.lower() != own
    referer = request.headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() != own
    return False  # no header to judge by (curl, an old browser): the CSRF token still decides


class GuardMiddleware(BaseHTTPMiddleware):
    """Signs requests in (or sends them to ``/login``), refuses cross-site POSTs, adds the safe headers."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        super().__init__(app)
        self._guard = guard

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await self._checked(request, call_next)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    async def _checked(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if not self._guard.is_allowed_host(request):
            return PlainTextResponse(
                "this dashboard answers only to localhost, 127.0.0.1, [::1] or the address it is bound to",
                status_code=400,
            )
        if request.method not in ("GET", "HEAD", "POST"):
            return PlainTextResponse("method not allowed", status_code=405)
        if request.method == "POST" and is_cross_site(request):
            return PlainTextResponse("cross-site request refused", status_code=403)
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        if not public and not self._guard.is_signed_in(request):
            if request.method == "GET":
                return RedirectResponse(f"/login?next={_local(path)}", status_code=303)
            return PlainTextResponse("sign in first: the dashboard needs its token", status_code=401)
        return await call_next(request)


def _local(path: str) -> str:
    """A path to come back to after the login: only a path of this site (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") else "/"


def safe_next(value: str | None) -> str:
    """The ``next`` of a login form, kept only if it is a path of this site."""
    return _local(value or "/")
