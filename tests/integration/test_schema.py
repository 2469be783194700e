"""`stepline schema`: the printed JSON Schemas hold for the messages Stepline really publishes.

RabbitMQ only: the schemas are of what travels on the wire, and a queue of the
test's own, bound to the exchange, sees every start and event the Producer and
the Client publish, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
from jsonschema import Draft202012Validator

from stepline import Client, Producer
from stepline.shared.settings import Settings
from stepline.shared.topology import exchange_name
from tests.support import cli
from tests.support.amqp import raw_channel
from tests.support.fleet import Fleet, process_env
from tests.support.polling import eventually


@asynccontextmanager
async def captured(settings: Settings) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue of this test's own that gets a copy of every start and event published."""
    async with raw_channel(settings.amqp) as channel:
        exchange = await channel.get_exchange(exchange_name(settings.namespace), ensure=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        for pattern in ("start.#", "event.#"):
            await queue.bind(exchange, pattern)
        yield queue


async def _bodies(queue: aio_pika.abc.AbstractQueue, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def take() -> int:
        message = await queue.get(no_ack=True, fail=False)
        if message is not None:
            found.append(json.loads(message.body))
        return len(found)

    await eventually(take, check=lambda n: n >= count, what=f"{count} captured messages")
    return found


def _problems(schema: dict[str, Any], instance: Any) -> list[str]:
    Draft202012Validator.check_schema(schema)  # the printed schema is itself valid draft 2020-12
    return [error.message for error in Draft202012Validator(schema).iter_errors(instance)]


async def test_published_starts_and_events_fit_the_printed_schemas(
    fleet: Fleet, producer: Producer, client: Client, settings: Settings
) -> None:
    result = await cli.run(process_env(settings), "stepline", "schema", "--workflows", "tests.workflows")
    printed = result.json()
    await fleet.start_worker()
    async with captured(settings) as queue:
        summed = await producer.start("sequence", {"a": 4, "b": 5}, priority=3)
        approval = await producer.start("typed-approval", None)

        async def status() -> str | None:
            info = await client.get(approval)
            return info.status if info else None

        await eventually(status, check=lambda found: found == "waiting", what="the approval's event wait")
        await client.send_event(approval, "decided", {"approved": True, "by": "ana"})
        messages = await _bodies(queue, 3)
    done = await client.wait(summed, timeout=30)

    starts = {m["instance_id"]: m for m in messages if m["kind"] == "start"}
    (event,) = [m for m in messages if m["kind"] == "event"]
    assert set(starts) == {summed, approval}
    assert starts[summed]["priority"] == 3
    for start in starts.values():
        assert _problems(printed["start"], start) == []
        assert _problems(printed["workflows"][start["workflow"]]["start"], start) == []
    assert _problems(printed["event"], event) == []
    assert _problems(printed["workflows"]["sequence"]["output"], done.output) == []

    # Not vacuous: what the worker would dead-letter breaks the printed schemas too.
    without_version = {key: value for key, value in starts[summed].items() if key != "v"}
    assert _problems(printed["start"], without_version) == ["'v' is a required property"]
    bad_params = {**starts[summed], "params": {"a": "four", "b": 5}}
    assert _problems(printed["workflows"]["sequence"]["start"], bad_params) == [
        "'four' is not of type 'integer'"
    ]
    assert _problems(printed["event"], {**event, "instance_id": "a\nb"}) != []
    assert (
        _problems(printed["workflows"]["sequence"]["start"], {**starts[approval]}) != []
    )  # another workflow


async def test_one_workflow_and_a_missing_one(settings: Settings) -> None:
    env = process_env(settings)
    one = (
        await cli.run(env, "stepline", "schema", "--workflows", "tests.workflows", "--workflow", "sequence")
    ).json()
    assert list(one["workflows"]) == ["sequence"]
    assert one["workflows"]["sequence"]["params"]["required"] == ["a", "b"]
    missing = await cli.run(env, "stepline", "schema", "--workflows", "tests.workflows", "--workflow", "nope")
    assert missing.returncode == 2, missing
    assert "workflow 'nope' is not defined in tests.workflows" in missing.stderr
