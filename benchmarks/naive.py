"""The references: the naive step loop and the raw rate of its transaction.

The naive loop is the least a step can cost in this architecture. Per message it
does: consume; one transaction that updates the instance row, inserts a result
row and an outbox row; publish the next message (persistent, with a publisher
confirm, ``mandatory``); ack. No history, no replay, no fencing, no cleanup of
the outbox row. Run one process per worker process the engine gets::

    python -m benchmarks.naive --database-url URL --amqp-url URL --queue NAME

The driver (``benchmarks.sections``) creates the tables, seeds the instances and
publishes each instance's first message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator

import aio_pika
import psycopg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

DDL = """
CREATE TABLE IF NOT EXISTS naive_instances (
    id text PRIMARY KEY,
    steps int NOT NULL,
    step int NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS naive_results (
    instance_id text NOT NULL,
    step int NOT NULL,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, step)
);
CREATE TABLE IF NOT EXISTS naive_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    routing_key text NOT NULL,
    body bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""
TRUNCATE = "TRUNCATE naive_instances, naive_results, naive_outbox"
EXCHANGE = "naive"

UPDATE_INSTANCE = (
    "UPDATE naive_instances SET step = %(step)s, updated_at = now(),"
    " finished_at = CASE WHEN %(last)s THEN now() END WHERE id = %(id)s"
)
INSERT_RESULT = (
    "INSERT INTO naive_results (instance_id, step, result) VALUES (%(id)s, %(step)s, %(result)s)"
    " ON CONFLICT DO NOTHING"
)
INSERT_OUTBOX = "INSERT INTO naive_outbox (routing_key, body) VALUES (%(key)s, %(body)s)"
ONE_STATEMENT = (
    "WITH updated AS (UPDATE naive_instances SET step = %(step)s, updated_at = now() WHERE id = %(id)s),"
    " stored AS (INSERT INTO naive_results (instance_id, step, result) VALUES (%(id)s, %(step)s, %(result)s)"
    " ON CONFLICT DO NOTHING)"
    " INSERT INTO naive_outbox (routing_key, body) VALUES (%(key)s, %(body)s)"
)
"""The same transaction as one statement: one round trip instead of five (BEGIN, 3 statements, COMMIT)."""


def body(instance_id: str, step: int, steps: int) -> bytes:
    """The message that runs ``step`` (from 1) of an instance."""
    return json.dumps({"id": instance_id, "step": step, "steps": steps}).encode()


async def step_transaction(
    conn: psycopg.AsyncConnection[object], instance_id: str, step: int, steps: int, queue: str
) -> None:
    """The one transaction of a naive step (the last step finishes the instance: no next message)."""
    last = step >= steps
    async with conn.transaction():
        await conn.execute(UPDATE_INSTANCE, {"step": step, "last": last, "id": instance_id})
        await conn.execute(
            INSERT_RESULT, {"id": instance_id, "step": step, "result": json.dumps({"value": step})}
        )
        if not last:
            await conn.execute(INSERT_OUTBOX, {"key": queue, "body": body(instance_id, step + 1, steps)})


class Pool:
    """A fixed set of connections, one per concurrent step."""

    def __init__(self, connections: list[psycopg.AsyncConnection[object]]) -> None:
        self._free: asyncio.Queue[psycopg.AsyncConnection[object]] = asyncio.Queue()
        self._all = connections
        for conn in connections:
            self._free.put_nowait(conn)

    @classmethod
    async def open(cls, url: str, size: int) -> Pool:
        return cls([await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(size)])

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[object]]:
        conn = await self._free.get()
        try:
            yield conn
        finally:
            self._free.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()


async def declare(channel: aio_pika.abc.AbstractChannel, queue: str) -> AbstractExchange:
    """The naive loop's durable exchange and queue (idempotent)."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    declared = await channel.declare_queue(queue, durable=True)
    await declared.bind(exchange, queue)
    return exchange


async def publish(exchange: AbstractExchange, queue: str, payload: bytes) -> None:
    """Persistent, mandatory, confirmed (the channel has publisher confirms on)."""
    message = aio_pika.Message(
        payload, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
    )
    await exchange.publish(message, queue, mandatory=True)


async def consume(database_url: str, amqp_url: str, queue: str, concurrency: int, prefetch: int) -> None:
    """Run the naive loop until SIGTERM."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    pool = await Pool.open(database_url, concurrency)
    connection = await aio_pika.connect(amqp_url)
    try:
        publish_channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare(publish_channel, queue)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        incoming = await consume_channel.get_queue(queue)
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def handle(message: AbstractIncomingMessage) -> None:
            try:
                job = json.loads(message.body)
                instance_id, step = str(job["id"]), int(job["step"])
                steps = int(job["steps"])
                last = step >= steps
                async with pool.connection() as conn:
                    await step_transaction(conn, instance_id, step, steps, queue)
                if not last:
                    await publish(exchange, queue, body(instance_id, step + 1, steps))
                await message.ack()
            except Exception as exc:  # a reference loop: report and give the message back
                print(f"naive step failed: {type(exc).__name__}: {exc}", flush=True)
                await message.nack(requeue=True)
            finally:
                slots.release()

        async def on_message(message: AbstractIncomingMessage) -> None:
            await slots.acquire()
            task = asyncio.create_task(handle(message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        tag = await incoming.consume(on_message)
        print("naive ready", flush=True)
        await stopping.wait()
        await incoming.cancel(tag)
        if tasks:
            await asyncio.wait(set(tasks), timeout=10)
    finally:
        await connection.close()
        await pool.close()


async def insert_instances(database_url: str, ids: list[str], steps: int) -> None:
    """Create the instance rows the loop will update."""
    async with (
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn,
        conn.cursor() as cursor,
    ):
        await cursor.executemany(
            "INSERT INTO naive_instances (id, steps) VALUES (%s, %s)", [(i, steps) for i in ids]
        )


async def publish_first(amqp_url: str, queue: str, ids: list[str], steps: int) -> float:
    """Publish each instance's first step; returns the wall time publishing began."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await declare(channel, queue)
        began = time.time()
        await asyncio.gather(*(publish(exchange, queue, body(i, 1, steps)) for i in ids))
        return began
    finally:
        await connection.close()


async def raw_transactions(database_url: str, *, clients: int, seconds: float, one_statement: bool) -> int:
    """Run the naive step transaction alone from ``clients`` connections; returns how many committed.

    With ``one_statement`` the three writes go as one statement (an implicit
    transaction, one round trip); otherwise as the naive loop sends them.
    """
    count = 0
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        nonlocal count
        instance_id = f"raw-{index}-{int(one_statement)}"
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO naive_instances (id, steps) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (instance_id, 1 << 30),
            )
            step = 0
            while time.monotonic() < deadline:
                step += 1
                if one_statement:
                    params = {
                        "id": instance_id,
                        "step": step,
                        "result": json.dumps({"value": step}),
                        "key": "raw",
                        "body": body(instance_id, step + 1, 1 << 30),
                    }
                    await conn.execute(ONE_STATEMENT, params)
                else:
                    await step_transaction(conn, instance_id, step, 1 << 30, "raw")
                count += 1

    await asyncio.gather(*(client(index) for index in range(clients)))
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description="The naive step loop (a benchmark reference).")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", default="naive")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(consume(args.database_url, args.amqp_url, args.queue, args.concurrency, args.prefetch))


if __name__ == "__main__":
    main()
