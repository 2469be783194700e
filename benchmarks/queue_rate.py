"""``python -m benchmarks.queue_rate``: what one RabbitMQ queue carries on this machine, by queue type.

For ``docs/scaling.md``: when does one workflow's queue become the bottleneck?
On a vhost of its own (made and deleted by this run, on the broker that
``STEPLINE_AMQP_URL`` names), for a classic, a quorum and a stream queue in
turn: publish ``--messages`` persistent messages of ``--body-bytes`` with
publisher confirms (``mandatory``, ``--window`` unconfirmed at most, as the
outbox relay publishes), then consume them with manual acks (prefetch
``--prefetch``, one ack per message, as a worker acks), then both at once.
Each queue is deleted when its type is done, then the vhost.

The client is aio-pika, the engine's own, in this one Python process (a connection
per side): on a 2-core machine that shares its cores with the broker, the figures
are what one Python process pushes through one queue, a lower bound on the
broker's own rate; "both" (publisher and consumer in the same event loop) most of all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pamqp.common import FieldTable

from benchmarks.isolation import DEFAULT_AMQP_URL, _create_vhost, _delete_vhost
from benchmarks.procs import ROOT

QUEUE_TYPES = ("classic", "quorum", "stream")


def vhost_url(base: str, vhost: str) -> str:
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))


async def declare(channel: AbstractChannel, name: str, kind: str) -> AbstractQueue:
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": kind})


async def publish(
    connection: aio_pika.abc.AbstractConnection, name: str, count: int, body: bytes, window: int
) -> float:
    """Publish ``count`` messages with confirms, ``window`` in flight; seconds taken."""
    channel = await connection.channel(publisher_confirms=True)
    began = time.perf_counter()
    for first in range(0, count, window):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=name,
                    mandatory=True,
                )
                for _ in range(min(window, count - first))
            )
        )
    elapsed = time.perf_counter() - began
    await channel.close()
    return elapsed


async def consume(
    connection: aio_pika.abc.AbstractConnection,
    name: str,
    count: int,
    prefetch: int,
    offset: str | None = None,
) -> float:
    """Consume and ack ``count`` messages one by one; seconds from the first delivery's request."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(name, ensure=False)
    done = asyncio.Event()
    seen = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    # A stream keeps what it was sent; its consumer says where to start reading.
    arguments: FieldTable | None = None if offset is None else {"x-stream-offset": offset}
    began = time.perf_counter()
    tag = await queue.consume(on_message, arguments=arguments)
    await asyncio.wait_for(done.wait(), timeout=600)
    elapsed = time.perf_counter() - began
    await queue.cancel(tag)
    await channel.close()
    return elapsed


async def one_type(amqp_url: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    name = f"queue-rate-{kind}"
    body = os.urandom(args.body_bytes // 2).hex().encode()[: args.body_bytes]
    n = args.messages
    publisher = await aio_pika.connect(amqp_url)
    consumer = await aio_pika.connect(amqp_url)
    try:
        admin = await publisher.channel()
        queue = await declare(admin, name, kind)
        result: dict[str, Any] = {"messages": n}
        stream = kind == "stream"
        result["publish_only_s"] = await publish(publisher, name, n, body, args.window)
        result["consume_only_s"] = await consume(
            consumer, name, n, args.prefetch, "first" if stream else None
        )
        consumed = asyncio.create_task(consume(consumer, name, n, args.prefetch, "next" if stream else None))
        await asyncio.sleep(0.2)  # the consumer is registered before the first publish
        published = await publish(publisher, name, n, body, args.window)
        result["both_s"] = max(published, await consumed - 0.2)  # from the first publish
        await queue.delete(if_unused=False, if_empty=False)
        await admin.close()
    finally:
        await publisher.close()
        await consumer.close()
    for key in [key for key in result if key.endswith("_s")]:
        result[key.removesuffix("_s") + "_per_s"] = n / result[key]
    return result


async def run(amqp_url: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for kind in args.types:
        print(f"queue_rate: {kind} queue, {args.messages} messages of {args.body_bytes} B ...", flush=True)
        results[kind] = await one_type(amqp_url, kind, args)
        figures = ", ".join(
            f"{key} {value:,.0f}" for key, value in results[kind].items() if key.endswith("_per_s")
        )
        print(f"  {kind}: messages/s: {figures}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queue_rate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--amqp-url", default=os.environ.get("STEPLINE_AMQP_URL") or DEFAULT_AMQP_URL)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--body-bytes", type=int, default=600, help="about a step message's size")
    parser.add_argument("--window", type=int, default=200, help="unconfirmed publishes at most")
    parser.add_argument("--prefetch", type=int, default=32, help="a worker's default prefetch (2 x 16)")
    parser.add_argument("--types", nargs="+", choices=QUEUE_TYPES, default=list(QUEUE_TYPES))
    args = parser.parse_args(argv)
    vhost = f"stepline-queue-rate-{uuid.uuid4().hex[:8]}"
    url = vhost_url(args.amqp_url, vhost)
    _create_vhost(url, vhost)
    try:
        results = asyncio.run(run(url, args))
    finally:
        _delete_vhost(url, vhost)
    out = ROOT / "benchmarks" / "results" / f"queue-rate-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    meta = {"load_average": os.getloadavg(), **{k: v for k, v in vars(args).items() if k != "amqp_url"}}
    out.write_text(json.dumps({"meta": meta, "queues": results}, indent=1))
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
