"""Type-checked, never run: proves the public API reads well to mypy (``mypy --strict``).

``tests/unit/test_typing_usage.py`` runs mypy on this file and on a broken copy of a call.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, assert_type

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline import Client, InstanceInfo, Producer
from stepline.worker import Context, RetryPolicy, Workflow, step_info, workflow


class Order(BaseModel):
    sku: str
    qty: int


class Stock(BaseModel):
    sku: str
    reserved: int


class Receipt(BaseModel):
    sku: str
    total: int
    email_id: str
    invoice_id: str


async def reserve(sku: str, qty: int) -> Stock:
    """A typed async step."""
    assert_type(step_info().idempotency_key, str)
    return Stock(sku=sku, reserved=qty)


def price(qty: int, unit_cents: int) -> int:
    """A typed sync step (run in a thread)."""
    return qty * unit_cents


async def record_sale(conn: AsyncConnection, sku: str, cents: int) -> int:
    """A typed transactional step: the engine's connection, then its arguments."""
    await conn.execute(
        sa.text("INSERT INTO sales (sku, cents) VALUES (:sku, :cents)"), {"sku": sku, "cents": cents}
    )
    return cents


async def release(sku: str, qty: int, stock: Stock) -> None:
    """The compensation of ``reserve``: its arguments, then its result."""


@workflow("audit")
async def audit(ctx: Context, params: Order) -> int:
    return params.qty


async def send_email(sku: str) -> str:
    return f"mail-{sku}"


async def make_invoice(total: int) -> str:
    return f"inv-{total}"


@workflow("order-fulfilment")
async def order_fulfilment(ctx: Context, params: Order) -> Receipt:
    assert_type(params, Order)
    assert_type(ctx.instance_id, str)
    stock = await ctx.step(
        "reserve-stock",
        reserve,
        params.sku,
        params.qty,
        retry=RetryPolicy(limit=5, delay="2s", backoff="exponential", max_delay="1 minute"),
        timeout="30s",
        compensate=release,
        compensate_retry=RetryPolicy(limit=10),
    )
    assert_type(stock, Stock)
    audit_id = ctx.start_child("audit", audit, params)
    assert_type(audit_id, str)
    total = await ctx.step("price", price, stock.reserved, 250)
    assert_type(total, int)
    sold = await ctx.transaction("record-sale", record_sale, stock.sku, total, retry=RetryPolicy(limit=3))
    assert_type(sold, int)
    await ctx.sleep("cool-off", "10s")
    await ctx.sleep_until("tomorrow", datetime(2030, 1, 1, tzinfo=UTC))
    email_id, invoice_id = await asyncio.gather(
        ctx.step("email", send_email, stock.sku),
        ctx.step("invoice", make_invoice, total),
    )
    assert_type(email_id, str)
    assert_type(invoice_id, str)
    assert_type(ctx.now(), datetime)
    assert_type(ctx.random(), float)
    assert_type(await ctx.wait_for_child(audit_id), Any)  # the output of a child known by its id
    return Receipt(sku=stock.sku, total=total, email_id=email_id, invoice_id=invoice_id)


assert_type(order_fulfilment, Workflow[Order, Receipt])


async def terminate_with_rollback(client: Client) -> None:
    info = await client.terminate("o-1", rollback=True, children=True)
    assert_type(info.rolling_back, bool)


async def start_and_follow(amqp_url: str, database_url: str) -> InstanceInfo | None:
    async with Producer(amqp_url) as producer:
        instance_id = await producer.start(order_fulfilment, Order(sku="A-1", qty=2))
        assert_type(instance_id, str)
        by_name = await producer.start("order-fulfilment", {"sku": "A-1", "qty": 2}, instance_id="o-1")
        assert_type(by_name, str)
        ids = await producer.start_batch(order_fulfilment, [Order(sku="B", qty=1)])
        assert_type(ids, list[str])
    async with Client(database_url, amqp_url) as client:
        # The Client's starts are the Producer's, with the same signature.
        assert_type(await client.start(order_fulfilment, Order(sku="C", qty=1), priority=3), str)
        assert_type(
            await client.start_batch("order-fulfilment", [{"sku": "D"}], instance_ids=["d"]), list[str]
        )
        info = await client.get(instance_id)
        assert_type(info, InstanceInfo | None)
        if info is not None:
            assert_type(info.status, str)
        return info
