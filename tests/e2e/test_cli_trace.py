"""``stepline history`` and ``stepline status`` name the instance's trace, and link it in Jaeger."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from stepline import Client, Producer
from stepline.producer.cli import trace_id_of
from stepline.shared.hooks import NoHooks
from stepline.shared.settings import Settings
from tests.support import cli
from tests.support.fleet import ProcessFleet, process_env, until_consuming

pytestmark = pytest.mark.e2e

JAEGER = "http://jaeger.example:16686"
PRODUCER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PRODUCER_TRACEPARENT = f"00-{PRODUCER_TRACE_ID}-00f067aa0ba902b7-01"


class _TracedPublish(NoHooks):
    """A service whose own tracing put a known ``traceparent`` on the start event."""

    @contextmanager
    def publish(self, workflow: str, routing_key: str, instance_id: str) -> Iterator[dict[str, str]]:
        yield {"traceparent": PRODUCER_TRACEPARENT}


@pytest.fixture
def env(settings: Settings) -> dict[str, str]:
    """A user's environment for this test's database and namespace, with no Jaeger URL."""
    plain = process_env(settings)
    plain.pop("STEPLINE_JAEGER_URL", None)
    return plain


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        (PRODUCER_TRACEPARENT, PRODUCER_TRACE_ID),
        (PRODUCER_TRACEPARENT.upper(), PRODUCER_TRACE_ID),
        (f" {PRODUCER_TRACEPARENT}\n", PRODUCER_TRACE_ID),
        (f"cc-{PRODUCER_TRACE_ID}-00f067aa0ba902b7-01-future", PRODUCER_TRACE_ID),  # later versions may add
        (None, None),
        ("", None),
        ("garbage", None),
        (f"00-{PRODUCER_TRACE_ID}-00f067aa0ba902b7", None),  # no flags
        (f"00-{PRODUCER_TRACE_ID}-00f067aa0ba902b7-01-extra", None),  # version 00 has exactly 4 fields
        (f"ff-{PRODUCER_TRACE_ID}-00f067aa0ba902b7-01", None),  # version ff is invalid
        (f"00-{PRODUCER_TRACE_ID[:-1]}-00f067aa0ba902b7-01", None),  # 31 hex digits
        (f"00-{PRODUCER_TRACE_ID[:-1]}g-00f067aa0ba902b7-01", None),  # not hex
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero trace id
        (f"00-{PRODUCER_TRACE_ID}-{'0' * 16}-01", None),  # all-zero span id
    ],
)
def test_trace_id_of_reads_w3c_traceparents(traceparent: str | None, expected: str | None) -> None:
    assert trace_id_of(traceparent) == expected


async def test_history_and_status_show_the_trace_id_and_link_it_in_jaeger(
    env: dict[str, str],
    process_fleet: ProcessFleet,
    client: Client,
    settings: Settings,
    workflows: Mapping[str, object],
) -> None:
    # The real command, not the in-process fleet: its telemetry hooks give every instance a trace.
    process_fleet.start("w1", "stepline-worker", "--workflows", "tests.workflows")
    await until_consuming(settings, workflows)
    jaeger_env = {**env, "STEPLINE_JAEGER_URL": JAEGER + "/"}  # the trailing slash is dropped
    async with Producer(
        settings.amqp, namespace=settings.namespace, hooks=_TracedPublish(), broker=settings.broker
    ) as producer:
        await producer.start("sequence", {"a": 1, "b": 2}, instance_id="traced")
    # Started with no trace context at all: the worker starts a trace of the instance's own.
    started = await cli.run(
        env, "stepline", "start", "sequence", "--params", '{"a":1,"b":2}', "--id", "untraced"
    )
    assert started.returncode == 0, started

    traced, untraced = await asyncio.gather(client.wait("traced", 30), client.wait("untraced", 30))
    assert (traced.status, untraced.status) == ("complete", "complete")
    assert traced.trace_context is not None
    assert untraced.trace_context is not None
    # The instance joins the producer's trace; its stored span is the workflow span, not the publish span.
    assert trace_id_of(traced.trace_context["traceparent"]) == PRODUCER_TRACE_ID
    assert traced.trace_context["traceparent"] != PRODUCER_TRACEPARENT
    own_trace_id = trace_id_of(untraced.trace_context["traceparent"])
    assert own_trace_id is not None
    assert own_trace_id != PRODUCER_TRACE_ID

    (
        history,
        history_untraced,
        status,
        history_plain,
        status_plain,
        table,
        status_table,
        table_plain,
    ) = await asyncio.gather(
        cli.run(jaeger_env, "stepline", "history", "traced", "--json"),
        cli.run(jaeger_env, "stepline", "history", "untraced", "--json"),
        cli.run(jaeger_env, "stepline", "status", "traced", "--json"),
        cli.run(env, "stepline", "history", "traced", "--json"),
        cli.run(env, "stepline", "status", "traced", "--json"),
        cli.run(jaeger_env, "stepline", "history", "traced"),
        cli.run(jaeger_env, "stepline", "status", "untraced"),
        cli.run(env, "stepline", "history", "traced"),
    )

    link = f"{JAEGER}/trace/{PRODUCER_TRACE_ID}"
    assert history.json()["trace_id"] == PRODUCER_TRACE_ID
    assert history.json()["trace_url"] == link
    assert history.json()["instance"]["id"] == "traced"
    assert history_untraced.json()["trace_id"] == own_trace_id
    assert history_untraced.json()["trace_url"] == f"{JAEGER}/trace/{own_trace_id}"
    assert status.json()["id"] == "traced"
    assert (status.json()["trace_id"], status.json()["trace_url"]) == (PRODUCER_TRACE_ID, link)

    # Without STEPLINE_JAEGER_URL the trace id is still there, and the link is null.
    assert (history_plain.json()["trace_id"], history_plain.json()["trace_url"]) == (PRODUCER_TRACE_ID, None)
    assert (status_plain.json()["trace_id"], status_plain.json()["trace_url"]) == (PRODUCER_TRACE_ID, None)

    assert table.returncode == 0, table
    assert f"trace {PRODUCER_TRACE_ID}  {link}" in table.stdout
    assert status_table.returncode == 0, status_table
    assert f"trace {own_trace_id}  {JAEGER}/trace/{own_trace_id}" in status_table.stdout
    assert table_plain.returncode == 0, table_plain
    assert f"trace {PRODUCER_TRACE_ID}\n" in table_plain.stdout
    assert "/trace/" not in table_plain.stdout


async def test_a_malformed_jaeger_url_is_a_configuration_error(env: dict[str, str]) -> None:
    result = await cli.run({**env, "STEPLINE_JAEGER_URL": "localhost:16686"}, "stepline", "history", "x")
    assert result.returncode == 1, result
    assert "STEPLINE_JAEGER_URL is invalid" in result.stderr
    assert "http:// or https://" in result.stderr
    assert "Traceback" not in result.output
