"""STEPLINE_TLS__*: the CA and client certificate reach both URLs; a URL's own options win; clear hints."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from stepline.shared.errors import ConfigError
from stepline.shared.settings import Settings, load_settings
from stepline.shared.startup import broker_hint, database_hint

MULTI_HOST_DATABASE = "postgresql://app@db1:5432,db2:5432/stepline?target_session_attrs=read-write"
MULTI_HOST_AMQP = "amqps://app:pw@mq1:5671,mq2:5671,mq3:5671/stepline"
# Whatever the shell (or the Makefile) exported: see tests/unit/conftest.py.
pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    made = {name: tmp_path / f"{name}.pem" for name in ("ca", "client", "client-key")}
    for path in made.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return made


def _query(url: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(url).query).items()}


def _configure(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], database: str, amqp: str) -> Settings:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", database)
    monkeypatch.setenv("STEPLINE_AMQP_URL", amqp)
    monkeypatch.setenv("STEPLINE_TLS__CA_FILE", str(files["ca"]))
    monkeypatch.setenv("STEPLINE_TLS__CERT_FILE", str(files["client"]))
    monkeypatch.setenv("STEPLINE_TLS__KEY_FILE", str(files["client-key"]))
    return load_settings()


def test_the_ca_and_client_certificate_reach_both_urls_of_a_multi_host_deployment(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    settings = _configure(monkeypatch, files, MULTI_HOST_DATABASE, MULTI_HOST_AMQP)

    database, amqp = settings.database, settings.amqp
    assert urlsplit(database).netloc == "app@db1:5432,db2:5432"
    assert _query(database) == {
        "target_session_attrs": "read-write",
        "sslmode": "verify-full",  # a CA is only worth giving to check the server with it
        "sslrootcert": str(files["ca"]),
        "sslcert": str(files["client"]),
        "sslkey": str(files["client-key"]),
    }
    assert urlsplit(amqp).netloc == "app:pw@mq1:5671,mq2:5671,mq3:5671"
    assert _query(amqp) == {
        "cafile": str(files["ca"]),
        "certfile": str(files["client"]),
        "keyfile": str(files["client-key"]),
    }


def test_tls_options_a_url_sets_itself_win(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    settings = _configure(
        monkeypatch,
        files,
        "postgresql://app@db/stepline?sslmode=verify-ca&sslrootcert=/etc/db-ca.pem",
        "amqps://app:pw@mq/stepline?cafile=/etc/mq-ca.pem",
    )

    database, amqp = _query(settings.database), _query(settings.amqp)
    assert (database["sslmode"], database["sslrootcert"]) == ("verify-ca", "/etc/db-ca.pem")
    assert database["sslcert"] == str(files["client"])
    assert amqp["cafile"] == "/etc/mq-ca.pem" and amqp["certfile"] == str(files["client"])


def test_a_plain_amqp_url_stays_plain_and_no_tls_settings_change_nothing(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    untouched = Settings(database_url="postgresql://app@db/stepline", amqp_url=MULTI_HOST_AMQP)
    assert (untouched.database, untouched.amqp) == ("postgresql://app@db/stepline", MULTI_HOST_AMQP)
    plain = "amqp://app:pw@mq:5672/stepline"
    assert _configure(monkeypatch, files, "postgresql://app@db/stepline", plain).amqp == plain


def test_a_path_with_a_space_survives_the_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spaced = tmp_path / "my certs" / "ca.pem"
    spaced.parent.mkdir()
    spaced.write_text("x")
    settings = Settings(
        database_url="postgresql://app@db/s", amqp_url="amqps://a:b@mq/s", tls={"ca_file": spaced}
    )
    assert _query(settings.database)["sslrootcert"] == str(spaced)
    assert "%20" in settings.amqp and "+" not in settings.amqp  # libpq reads no "+" as a space


def test_bad_tls_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    monkeypatch.setenv("STEPLINE_TLS__CA_FILE", "/nowhere/ca.pem")
    with pytest.raises(ConfigError, match="STEPLINE_TLS__CA_FILE is invalid"):
        load_settings(require=())
    monkeypatch.delenv("STEPLINE_TLS__CA_FILE")
    monkeypatch.setenv("STEPLINE_TLS__CERT_FILE", str(files["client"]))
    with pytest.raises(ConfigError, match="STEPLINE_TLS__CERT_FILE and STEPLINE_TLS__KEY_FILE must be set"):
        load_settings(require=())


def test_tls_failures_get_hints_naming_the_settings() -> None:
    unsigned = "SSL error: certificate verify failed"
    assert "not signed by the CA in STEPLINE_TLS__CA_FILE" in database_hint(unsigned)
    python_unsigned = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed certificate"
    assert "not signed by the CA" in broker_hint(python_unsigned, url="amqps://a:b@mq/")
    mismatch = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch"
    assert "does not name the host in STEPLINE_AMQP_URL" in broker_hint(mismatch, url="amqps://a:b@mq/")
    libpq_mismatch = 'server certificate for "db.internal" does not match host name "10.0.0.5"'
    assert "does not name the host in STEPLINE_DATABASE_URL" in database_hint(libpq_mismatch)
    no_client = "FATAL:  connection requires a valid client certificate"
    assert "STEPLINE_TLS__CERT_FILE" in database_hint(no_client)
    reset = "Server connection reset: ConnectionResetError(104, 'Connection reset by peer')"
    assert "STEPLINE_TLS__CERT_FILE" in broker_hint(reset, url="amqps://a:b@mq/")
    # A reset with a client certificate offered, or on a plain listener, is an outage as before.
    assert "RabbitMQ runs" in broker_hint(reset, url="amqps://a:b@mq/?certfile=/c.pem&keyfile=/k.pem")
    assert "RabbitMQ runs" in broker_hint(reset, url="amqp://a:b@mq/")
