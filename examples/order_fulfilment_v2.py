"""Order fulfilment, version 2: a fraud check added behind ``ctx.patched``, as a live patch.

The same workflow as ``examples/order_fulfilment.py`` (same name, same steps
and models, imported from there) with one new step, ``fraud-check``, right
after ``charge-payment`` and before the cool-off. Deploy it over version 1
while orders sleep in their cool-off: those orders went past the patch point
without its marker, so ``ctx.patched("fraud-check")`` is False for them and
they finish exactly as version 1 would, with no fraud check. Every order that
reaches the point on this code (new ones, and any still before it) records the
marker and runs the check. See docs/versioning.md, "Worked example".

Run it with ``stepline-worker --workflows examples.order_fulfilment_v2``.
"""

from __future__ import annotations

import asyncio
import hashlib

from pydantic import BaseModel

from examples.order_fulfilment import (
    Order,
    Receipt,
    charge_payment,
    notify,
    reserve_stock,
    ship,
)
from stepline import Context, NonRetryableError, RetryPolicy, workflow

__all__ = ["FRAUD_LIMIT_CENTS", "FraudVerdict", "Order", "Receipt", "check_fraud", "order_fulfilment"]

FRAUD_LIMIT_CENTS = 500_000
"""Orders above this amount go to manual review instead of shipping."""


def _token(*parts: str) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]


class FraudVerdict(BaseModel):
    """What the fraud service says about one payment."""

    check_id: str
    score: int
    """0 (clean) to 99; only used for the log, the decision is the limit."""


async def check_fraud(order_id: str, payment_id: str, amount_cents: int) -> FraudVerdict:
    """Ask the fraud service about a payment; a refusal is final, so it is not retried."""
    if amount_cents > FRAUD_LIMIT_CENTS:
        raise NonRetryableError(f"order {order_id} needs manual review: {amount_cents} cents")
    await asyncio.sleep(0.01)
    return FraudVerdict(
        check_id="fc-" + _token(order_id, payment_id), score=int(_token(payment_id), 16) % 100
    )


@workflow("order-fulfilment")
async def order_fulfilment(ctx: Context, order: Order) -> Receipt:
    """From checkout to a shipped, notified order, with a fraud check for orders that reach it."""
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
    # New in version 2. Orders that were already in the cool-off when this was
    # deployed have history past this point without the marker: False, old path.
    if ctx.patched("fraud-check"):
        await ctx.step(
            "fraud-check",
            check_fraud,
            order.order_id,
            payment.payment_id,
            order.amount_cents,
            retry=RetryPolicy(limit=3, delay="1s", backoff="exponential"),
            timeout="30s",
        )
    await ctx.sleep("cool-off", "2s")
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
