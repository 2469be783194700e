"""Apply the TLS settings (a CA, a client certificate and key) to the two connection URLs.

Both drivers read their TLS options from the URL: libpq from ``sslmode``,
``sslrootcert``, ``sslcert`` and ``sslkey``, aio-pika from ``cafile``,
``certfile`` and ``keyfile`` on an ``amqps://`` URL. ``STEPLINE_TLS__*`` fill
in what a URL leaves out, so one CA serves both connections, and an option
written in a URL wins: that is the per-connection override.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

VERIFY_FULL = "verify-full"
"""libpq's ``sslmode`` that checks the chain and that the certificate names the host."""


@dataclass(frozen=True)
class TlsFiles:
    """The CA bundle that verifies servers, and the client certificate and key if servers ask for one."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def is_empty(self) -> bool:
        """Whether no file is configured (the URLs are then used as they are)."""
        return self.ca_file is None and self.cert_file is None


def database_url_with_tls(url: str, files: TlsFiles) -> str:
    """The PostgreSQL URL with the CA and client certificate as libpq parameters.

    A CA without an ``sslmode`` in the URL means ``verify-full``: the chain must
    lead to the CA and the certificate must name the host the URL connects to.
    """
    if files.is_empty:
        return url
    wanted: dict[str, str] = {}
    if files.ca_file is not None:
        wanted["sslrootcert"] = str(files.ca_file)
        wanted["sslmode"] = VERIFY_FULL
    if files.cert_file is not None and files.key_file is not None:
        wanted["sslcert"] = str(files.cert_file)
        wanted["sslkey"] = str(files.key_file)
    return _with_query_defaults(url, wanted)


def amqp_url_with_tls(url: str, files: TlsFiles) -> str:
    """An ``amqps://`` URL with the CA and client certificate as aio-pika parameters.

    An ``amqp://`` URL names a plain listener and is returned unchanged.
    aio-pika always checks the chain and the host name on ``amqps://``.
    """
    if files.is_empty or not url.startswith("amqps://"):
        return url
    wanted: dict[str, str] = {}
    if files.ca_file is not None:
        wanted["cafile"] = str(files.ca_file)
    if files.cert_file is not None and files.key_file is not None:
        wanted["certfile"] = str(files.cert_file)
        wanted["keyfile"] = str(files.key_file)
    return _with_query_defaults(url, wanted)


def tls_hint(cause: str, *, url_setting: str, sends_certificate: bool) -> str | None:
    """What to do about a TLS failure, going by the driver's words; None if the cause is not one.

    Args:
        cause: the driver's error, on one line.
        url_setting: the variable holding the URL (``STEPLINE_DATABASE_URL`` or ``STEPLINE_AMQP_URL``).
        sends_certificate: whether the connection offered a client certificate.
    """
    lowered = cause.lower()
    if "certificate verify failed" in lowered:
        if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
            return _NAME_HINT.format(url_setting=url_setting)
        return (
            "the server's certificate is not signed by the CA in STEPLINE_TLS__CA_FILE (or the URL's "
            "sslrootcert / cafile): give the CA that signed it, or connect to the server you meant"
        )
    if "does not match host name" in lowered:
        return _NAME_HINT.format(url_setting=url_setting)
    if "root certificate file" in lowered and "does not exist" in lowered:
        return "set STEPLINE_TLS__CA_FILE to the CA that signed the server's certificate"
    if "requires a valid client certificate" in lowered or "certificate required" in lowered:
        return _CLIENT_CERTIFICATE_HINT
    if not sends_certificate and "connection reset" in lowered:
        # A RabbitMQ listener with fail_if_no_peer_cert resets a TLS 1.3 connection that offers
        # none only after the client saw the handshake through: no alert to quote.
        return (
            "the server closed the TLS connection, as RabbitMQ does when it asks for a client "
            "certificate and gets none: set STEPLINE_TLS__CERT_FILE and STEPLINE_TLS__KEY_FILE"
        )
    return None


def is_tls_refusal(cause: str) -> bool:
    """Whether a connection failed on TLS settings that no retry changes, going by the driver's words.

    A certificate the CA did not sign or that names another host, a missing CA
    file, a server that wants a client certificate: a process waiting out its
    start-up timeout for these only delays the error. (A bare connection reset
    is not one: a restarting server resets connections too.)
    """
    lowered = cause.lower()
    return any(words in lowered for words in _TLS_REFUSALS)


_TLS_REFUSALS = (
    "certificate verify failed",
    "does not match host name",
    "root certificate file",
    "requires a valid client certificate",
    "certificate required",
)
_NAME_HINT = (
    "the server's certificate does not name the host in {url_setting}: connect by a name or address "
    "the certificate lists (subjectAltName)"
)
_CLIENT_CERTIFICATE_HINT = (
    "the server asks for a client certificate: set STEPLINE_TLS__CERT_FILE and STEPLINE_TLS__KEY_FILE "
    "(PostgreSQL's clientcert=verify-full also wants its CN to be the database user)"
)


def _with_query_defaults(url: str, defaults: dict[str, str]) -> str:
    """``url`` with each of ``defaults`` added to its query unless the query already sets it.

    Only the query is touched: the host part may name several hosts
    (``h1:5432,h2:5432``), which ``urlsplit`` keeps as it is.
    """
    parts = urlsplit(url)
    present = {key for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    added = [(key, value) for key, value in defaults.items() if key not in present]
    if not added:
        return url
    extra = urlencode(added, safe="/", quote_via=quote)  # a space as %20: libpq has no "+"
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


__all__ = [
    "VERIFY_FULL",
    "TlsFiles",
    "amqp_url_with_tls",
    "database_url_with_tls",
    "is_tls_refusal",
    "tls_hint",
]
