"""Publish example orders: ``python -m examples.produce --count 20`` (docker-compose's demo producer)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from examples.order_fulfilment import Order, order_fulfilment
from stepline import ConfigError, Producer, SteplineError, load_settings


def orders(count: int) -> list[Order]:
    """``count`` plausible orders with unique ids."""
    batch = uuid.uuid4().hex[:6]
    return [
        Order(
            order_id=f"SO-{batch}-{n}",
            sku=("KB-75-BROWN", "MON-27-4K", "USB-C-HUB")[n % 3],
            quantity=1 + n % 3,
            amount_cents=1999 + 1000 * (n % 7),
            email=f"customer{n}@example.com",
        )
        for n in range(count)
    ]


async def publish(count: int) -> list[str]:
    """Start ``count`` order-fulfilment instances; returns their ids."""
    settings = load_settings(require=("amqp_url",))
    async with Producer.from_settings(settings) as producer:
        return await producer.start_batch(order_fulfilment, orders(count))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20, help="orders to start (default 20)")
    args = parser.parse_args()
    try:
        ids = asyncio.run(publish(args.count))
    except (ConfigError, SteplineError) as exc:
        print(f"produce: {exc}", file=sys.stderr)
        return 2
    for instance_id in ids:
        print(instance_id)
    print(f"started {len(ids)} order-fulfilment instances", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
