"""Passwords never reach logs, errors or reprs: the one masking function and the places that print a URL."""

from __future__ import annotations

import pytest

from stepline.shared.amqp_url import parse_amqp_url
from stepline.shared.errors import ServiceUnavailableError
from stepline.shared.redaction import mask_url, scrub_password


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://guest:s3cret@h:5672/v", "amqp://guest:***@h:5672/v"),
        ("amqps://user:s3cret@host/vhost?heartbeat=30", "amqps://user:***@host/vhost?heartbeat=30"),
        ("amqp://u:s3cret@h1:5672,h2:5672/v", "amqp://u:***@h1:5672,h2:5672/v"),
        ("postgresql://app:s3cret@db:5432/orders", "postgresql://app:***@db:5432/orders"),
        (
            "postgresql://app:s3cret@h1:5441,h2:5442/orders?target_session_attrs=read-write",
            "postgresql://app:***@h1:5441,h2:5442/orders?target_session_attrs=read-write",
        ),
        (
            "postgresql://app:s3cret@/orders?host=h1:5441&host=h2:5442",
            "postgresql://app:***@/orders?host=h1:5441&host=h2:5442",
        ),
        (
            "postgresql://app@db/orders?password=s3cret&sslmode=require",
            "postgresql://app@db/orders?password=***&sslmode=require",
        ),
        # A password written without percent-encoding: '@', '/', '?' and ':' in it.
        ("postgresql://app:s3c@ret@db/orders", "postgresql://app:***@db/orders"),
        ("amqp://u:s3c/ret@h1,h2/v", "amqp://u:***@h1,h2/v"),
        ("amqp://u:s3c?ret@h/v", "amqp://u:***@h/v"),
        ("amqp://u:s3:cret@h/v", "amqp://u:***@h/v"),
        # No password: unchanged.
        ("amqp://h/v", "amqp://h/v"),
        ("amqp://guest@h/v", "amqp://guest@h/v"),
        ("postgresql://db:5432/orders?application_name=a", "postgresql://db:5432/orders?application_name=a"),
    ],
)
def test_every_form_of_url_has_its_password_masked(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_a_driver_text_loses_the_password_as_written_and_decoded() -> None:
    url = "postgresql://app:p%40ss%2Fw0rd@db/orders?password=other"
    text = "auth failed for p@ss/w0rd (p%40ss%2Fw0rd), then other"
    assert scrub_password(text, url) == "auth failed for *** (***), then ***"
    assert scrub_password("nothing secret", "amqp://h/v") == "nothing secret"


def test_a_parsed_amqp_url_keeps_its_password_out_of_its_repr_and_masked_form() -> None:
    target = parse_amqp_url("amqp://u:s3cret@h1:5672,h2:5672/v")
    assert "s3cret" not in repr(target)
    assert "s3cret" not in str(target)
    assert target.masked() == "amqp://u:***@h1:5672,h2:5672/v"
    assert "s3cret" in target.node_urls()[0]  # what aio-pika is given keeps it


@pytest.mark.parametrize(
    "url",
    ["amqp://u:s3c/ret@h1:5672,h2/v", "amqp://u:ab?cd@h/v", "amqp://u:ab#cd@h/v", "amqp://u:s3cret@h:bad/v"],
)
def test_a_malformed_amqp_url_is_refused_without_quoting_its_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_amqp_url(url)
    password = url.split(":", 2)[2].rpartition("@")[0]
    for fragment in (password, *password.replace("/", " ").replace("?", " ").replace("#", " ").split()):
        assert fragment not in str(caught.value)


def test_the_start_up_error_masks_the_url_it_is_given() -> None:
    error = ServiceUnavailableError("RabbitMQ", "amqp://u:s3cret@h1,h2/v", "refused", "check it", 5.0)
    assert "s3cret" not in str(error)
    assert "s3cret" not in error.url
    assert "amqp://u:***@h1,h2/v" in str(error)
