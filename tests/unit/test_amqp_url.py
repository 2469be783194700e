"""STEPLINE_AMQP_URL naming several nodes of a cluster, libpq-style: what each process connects to."""

from __future__ import annotations

import random

import pytest

from stepline.shared.amqp_url import AmqpNode, parse_amqp_url
from stepline.shared.errors import ConfigError
from stepline.shared.settings import load_settings


def test_every_node_gets_the_shared_user_vhost_and_query_and_its_own_port_or_the_schemes() -> None:
    target = parse_amqp_url(
        "amqp://u:p%40ss@h1:5673,h2,[::1]:5674/v%2F1?heartbeat=5&load_balance_hosts=disable"
    )
    assert target.nodes == (AmqpNode("h1", 5673), AmqpNode("h2", 5672), AmqpNode("[::1]", 5674))
    assert target.node_urls() == [
        "amqp://u:p%40ss@h1:5673/v%2F1?heartbeat=5",
        "amqp://u:p%40ss@h2:5672/v%2F1?heartbeat=5",
        "amqp://u:p%40ss@[::1]:5674/v%2F1?heartbeat=5",
    ]
    assert parse_amqp_url("amqps://u:p@h1,h2/v").node_urls(random.Random(0))[0].endswith(":5671/v")


def test_random_order_is_a_shuffle_of_every_node_and_disable_keeps_the_order_written() -> None:
    url = "amqp://u:p@a,b,c,d,e/v"
    orders = {tuple(parse_amqp_url(url).node_urls(random.Random(seed))) for seed in range(20)}
    assert len(orders) > 1
    assert all(
        sorted(order) == sorted(parse_amqp_url(url + "?load_balance_hosts=disable").node_urls())
        for order in orders
    )
    assert [
        u.split("@")[1][0] for u in parse_amqp_url(url + "?load_balance_hosts=disable").node_urls()
    ] == list("abcde")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://u:s3cret@h1:5672,:5673/v", "empty host"),
        ("amqp://u:s3cret@h1:56x2,h2/v", "bad port '56x2' for host 'h1'"),
        ("amqp://u:s3cret@h1:70000/v", "bad port '70000'"),
        ("amqp://u:s3cret@[::1/v", "malformed IPv6 host"),
        ("amqp://u:s3cret@h1/v?load_balance_hosts=roundrobin", "'random' or 'disable'"),
        ("http://u:s3cret@h1/v", "must start with amqp:// or amqps://"),
    ],
)
def test_a_malformed_url_is_refused_at_start_naming_the_setting_and_never_the_password(
    url: str, says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STEPLINE_AMQP_URL", url)
    monkeypatch.setenv("STEPLINE_DATABASE_URL", "postgresql://postgres@127.0.0.1/db")
    monkeypatch.delenv("STEPLINE_EMBEDDED", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "STEPLINE_AMQP_URL" in str(caught.value)
    assert says in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_the_password_is_masked_in_a_list_of_nodes() -> None:
    assert parse_amqp_url("amqps://u:s3cret@h1,h2/v?x=1").masked() == "amqps://u:***@h1:5671,h2:5671/v?x=1"
