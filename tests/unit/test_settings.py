"""load_settings: STEPLINE_* variables, validated once, every problem in one message, no secret shown."""

from __future__ import annotations

from datetime import timedelta

import pytest

from stepline.shared.errors import ConfigError
from stepline.shared.settings import Settings, load_settings

DB_PASSWORD = "db-s3cret-pw"
AMQP_PASSWORD = "amqp-s3cret-pw"
DATABASE_URL = f"postgresql://stepline:{DB_PASSWORD}@db.internal:5432/stepline"
AMQP_URL = f"amqp://stepline:{AMQP_PASSWORD}@mq.internal:5672/stepline"
# Whatever the shell (or the Makefile) exported: see tests/unit/conftest.py.
pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("STEPLINE_AMQP_URL", AMQP_URL)


def _config_error(**kwargs: tuple[str, ...]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(**kwargs)
    return str(caught.value)


def test_both_urls_missing_are_reported_together() -> None:
    message = _config_error()
    assert message == "configuration error: STEPLINE_DATABASE_URL is not set; STEPLINE_AMQP_URL is not set"


def test_urls_are_read(urls: None) -> None:
    settings = load_settings()
    assert settings.database == DATABASE_URL
    assert settings.amqp == AMQP_URL


def test_defaults(urls: None) -> None:
    settings = load_settings()
    assert settings.namespace == "stepline"
    assert settings.max_payload_bytes == 1024 * 1024
    assert settings.worker.concurrency == 16
    assert settings.worker.workflows == []
    assert settings.worker.default_step_timeout == timedelta(minutes=10)
    assert settings.scheduler.poll_interval == timedelta(milliseconds=500)


def test_malformed_url_and_bad_nested_value_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", f"mysql://stepline:{DB_PASSWORD}@db.internal/stepline")
    monkeypatch.setenv("STEPLINE_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("STEPLINE_WORKER__CONCURRENCY", "0")
    message = _config_error()
    assert message.startswith("configuration error: ")
    assert "STEPLINE_DATABASE_URL is invalid" in message
    assert "must start with postgresql://" in message
    assert "STEPLINE_WORKER__CONCURRENCY is invalid" in message
    assert "greater than or equal to 1" in message
    assert message.count("STEPLINE_") == 2, message
    assert DB_PASSWORD not in message


def test_bad_amqp_url_is_reported_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", DATABASE_URL)
    monkeypatch.setenv("STEPLINE_AMQP_URL", f"http://guest:{AMQP_PASSWORD}@mq.internal/")
    message = _config_error()
    assert "STEPLINE_AMQP_URL is invalid" in message
    assert "amqp://" in message
    assert AMQP_PASSWORD not in message
    assert DB_PASSWORD not in message


def test_durations_are_parsed_from_env(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__SHUTDOWN_GRACE", "5 minutes")
    monkeypatch.setenv("STEPLINE_WORKER__DEFAULT_STEP_TIMEOUT", "90s")
    monkeypatch.setenv("STEPLINE_SCHEDULER__POLL_INTERVAL", "250ms")
    monkeypatch.setenv("STEPLINE_OUTBOX__SWEEP_AFTER", "1h 30m")
    settings = load_settings()
    assert settings.worker.shutdown_grace == timedelta(minutes=5)
    assert settings.worker.default_step_timeout == timedelta(seconds=90)
    assert settings.scheduler.poll_interval == timedelta(milliseconds=250)
    assert settings.outbox.sweep_after == timedelta(hours=1, minutes=30)


def test_bad_duration_in_env_names_the_variable(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__SHUTDOWN_GRACE", "soon")
    message = _config_error()
    assert "STEPLINE_WORKER__SHUTDOWN_GRACE is invalid" in message
    assert "not a duration" in message


def test_the_start_up_wait_is_a_setting(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().startup_timeout == timedelta(seconds=60)
    monkeypatch.setenv("STEPLINE_STARTUP_TIMEOUT", "5s")
    assert load_settings().startup_timeout == timedelta(seconds=5)
    monkeypatch.setenv("STEPLINE_STARTUP_TIMEOUT", "0s")
    assert "STEPLINE_STARTUP_TIMEOUT is invalid" in _config_error()


def test_plain_number_of_seconds_in_env_is_a_duration(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__SHUTDOWN_GRACE", "30")
    assert load_settings().worker.shutdown_grace == timedelta(seconds=30)


def test_overflowing_duration_in_env_is_a_config_error(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__SHUTDOWN_GRACE", "99999999999 days")
    assert "STEPLINE_WORKER__SHUTDOWN_GRACE" in _config_error()


def test_workflows_is_a_comma_separated_list(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__WORKFLOWS", "examples.orders, billing.flows ,,reports")
    assert load_settings().worker.workflows == ["examples.orders", "billing.flows", "reports"]


def test_single_workflow_module(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__WORKFLOWS", "examples.orders")
    assert load_settings().worker.workflows == ["examples.orders"]


def test_require_only_the_amqp_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_AMQP_URL", AMQP_URL)
    settings = load_settings(require=("amqp_url",))
    assert settings.amqp == AMQP_URL
    assert settings.database_url is None
    with pytest.raises(ConfigError, match="STEPLINE_DATABASE_URL is not set"):
        _ = settings.database


def test_require_only_the_amqp_url_still_reports_it_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_DATABASE_URL", DATABASE_URL)
    assert _config_error(require=("amqp_url",)) == "configuration error: STEPLINE_AMQP_URL is not set"


def test_require_nothing() -> None:
    settings = load_settings(require=())
    assert settings.database_url is None
    assert settings.amqp_url is None


def test_overrides_win_over_the_environment(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_NAMESPACE", "from-env")
    assert load_settings(namespace="from-cli").namespace == "from-cli"


def test_bad_top_level_number_is_named(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEPLINE_MAX_PAYLOAD_BYTES", "lots")
    assert "STEPLINE_MAX_PAYLOAD_BYTES is invalid" in _config_error()


def test_passwords_never_appear_in_str_or_repr(urls: None) -> None:
    settings = load_settings()
    for text in (str(settings), repr(settings), str(settings.database_url), repr(settings.amqp_url)):
        assert DB_PASSWORD not in text
        assert AMQP_PASSWORD not in text
    assert "**********" in repr(settings)


def test_settings_are_frozen(urls: None) -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.namespace = "other"  # type: ignore[misc]


def test_settings_read_the_environment_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # No module-level state: building the settings twice reads the environment twice.
    monkeypatch.setenv("STEPLINE_NAMESPACE", "first")
    assert Settings().namespace == "first"
    monkeypatch.setenv("STEPLINE_NAMESPACE", "second")
    assert Settings().namespace == "second"


def test_build_id_is_read_and_empty_means_the_default(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().worker.build_id is None
    monkeypatch.setenv("STEPLINE_WORKER__BUILD_ID", "release-2026.12.05+3f9c2e1")
    assert load_settings().worker.build_id == "release-2026.12.05+3f9c2e1"
    monkeypatch.setenv("STEPLINE_WORKER__BUILD_ID", "")
    assert load_settings().worker.build_id is None


@pytest.mark.parametrize("bad", ["x" * 65, "v1\nv2", "v1\x1b[31m", " v1"])
def test_a_build_id_that_cannot_be_shown_as_one_token_is_refused(
    urls: None, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__BUILD_ID", bad)
    assert "STEPLINE_WORKER__BUILD_ID is invalid" in _config_error()
