"""Keep passwords out of what Stepline prints: the one place URLs are masked and texts scrubbed.

Every log line, error text and repr that shows a database or broker URL goes
through ``mask_url``; every driver message that might quote one goes through
``scrub_password``. Both read the URL the same way, so a form one of them
understands (a host list, ``password=`` in the query, a password holding a raw
``/``, ``@`` or ``?``) is one the other understands too.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "***"
"""What stands in for a password."""

_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&#]*)", re.I)


def mask_url(url: str) -> str:
    """The URL as written, its password replaced by ``***``: safe for logs, errors and reprs.

    Masks a password after the user name (one host or a libpq/AMQP host list,
    even in a malformed URL) and a ``password=`` query parameter (libpq reads
    one there too). A URL without a password comes back unchanged.
    """
    span = _password_span(url)
    if span is not None:
        start, end = span
        url = f"{url[:start]}{MASK}{url[end:]}"
    return _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", url)


def scrub_password(text: str, url: str) -> str:
    """``text`` (a driver's error, say) with every password of ``url`` replaced by ``***``.

    Both the password as written and its percent-decoded form are replaced:
    a driver may quote either.
    """
    for secret in _passwords(url):
        text = text.replace(secret, MASK)
    return text


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the userinfo password of ``url`` sits (start, end), or None without one."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    at = _userinfo_end(url, start)
    colon = -1 if at < 0 else url.find(":", start, at)
    return None if colon < 0 else (colon + 1, at)


def _userinfo_end(url: str, start: int) -> int:
    """The index of the ``@`` that ends the userinfo starting at ``start`` (after ``://``), or -1.

    The userinfo ends at the last ``@`` of the authority. Where the authority
    has none, a password with a raw ``/``, ``?`` or ``#`` may have cut it
    short: then the last ``@`` of the whole URL ends it. That can take more
    than the userinfo of an odd URL for it, never less.
    """
    authority_end = min((i for i in (url.find(c, start) for c in "/?#") if i >= 0), default=len(url))
    at = url.rfind("@", start, authority_end)
    return at if at >= 0 else url.rfind("@", start)


def _passwords(url: str) -> list[str]:
    """The non-empty passwords ``url`` holds, as written and percent-decoded, longest first."""
    found = [value for _, value in _QUERY_PASSWORD.findall(url)]
    span = _password_span(url)
    if span is not None:
        found.append(url[span[0] : span[1]])
    secrets = {form for value in found for form in (value, unquote(value)) if value}
    return sorted(secrets, key=len, reverse=True)


__all__ = ["MASK", "mask_url", "scrub_password"]
