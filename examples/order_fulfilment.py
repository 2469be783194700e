"""Order fulfilment: reserve stock, charge the card (retrying a flaky gateway), cool off, ship, notify.

Run it with ``stepline-worker --workflows examples.order_fulfilment``.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel, Field

from stepline import Context, NonRetryableError, RetryPolicy, step_info, workflow


class Order(BaseModel):
    """What the shop sends when a customer checks out."""

    order_id: str
    sku: str
    quantity: int = Field(gt=0, le=100)
    amount_cents: int = Field(gt=0)
    email: str


class Reservation(BaseModel):
    reservation_id: str
    sku: str
    quantity: int


class Payment(BaseModel):
    payment_id: str
    amount_cents: int
    idempotency_key: str


class Shipment(BaseModel):
    tracking_number: str


class Receipt(BaseModel):
    order_id: str
    reservation_id: str
    payment_id: str
    tracking_number: str
    notified: bool


def _token(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]


async def reserve_stock(sku: str, quantity: int) -> Reservation:
    """Hold stock in the warehouse system."""
    if sku.startswith("DISCONTINUED"):
        raise NonRetryableError(f"{sku} is discontinued")
    await asyncio.sleep(0.01)
    return Reservation(
        reservation_id="res-" + _token(step_info().idempotency_key), sku=sku, quantity=quantity
    )


async def charge_payment(order_id: str, amount_cents: int) -> Payment:
    """Charge the card; the gateway times out on the first try for every third order."""
    info = step_info()
    if info.attempt == 1 and int(_token(order_id), 16) % 3 == 0:
        raise TimeoutError("payment gateway did not answer in time")
    await asyncio.sleep(0.01)
    # The idempotency key is what a real gateway uses to charge at most once.
    return Payment(
        payment_id="pay-" + _token(info.idempotency_key),
        amount_cents=amount_cents,
        idempotency_key=info.idempotency_key,
    )


def ship(order_id: str, reservation_id: str) -> Shipment:
    """Book the courier (a blocking client library, so it runs in a thread)."""
    return Shipment(tracking_number="TRK" + _token(order_id, reservation_id).upper())


async def notify(email: str, tracking_number: str) -> bool:
    """Email the customer their tracking number."""
    await asyncio.sleep(0.01)
    return "@" in email and bool(tracking_number)


@workflow("order-fulfilment")
async def order_fulfilment(ctx: Context, order: Order) -> Receipt:
    """From checkout to a shipped, notified order."""
    reservation = await ctx.step(
        "reserve-stock",
        reserve_stock,
        order.sku,
        order.quantity,
        retry=RetryPolicy(limit=5, delay="1s", backoff="exponential"),
        timeout="30s",
    )
    payment = await ctx.step(
        "charge-payment",
        charge_payment,
        order.order_id,
        order.amount_cents,
        retry=RetryPolicy(limit=3, delay="500ms", backoff="exponential"),
        timeout="30s",
    )
    await ctx.sleep("cool-off", "2s")  # give the fraud check a moment before the parcel leaves
    shipment = await ctx.step("ship", ship, order.order_id, reservation.reservation_id)
    notified = await ctx.step(
        "notify",
        notify,
        order.email,
        shipment.tracking_number,
        retry=RetryPolicy(limit=3, delay="1s", backoff="constant"),
    )
    return Receipt(
        order_id=order.order_id,
        reservation_id=reservation.reservation_id,
        payment_id=payment.payment_id,
        tracking_number=shipment.tracking_number,
        notified=notified,
    )
