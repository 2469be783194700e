"""A bank transfer between two rows of your own table, written exactly once: a transactional step.

The ``move`` step debits one account and credits the other inside the very
transaction that records the step's result (``ctx.transaction``): a retry, a
redelivered message or a worker killed mid-transfer can never move the money
twice, and no idempotency key is needed. An account that cannot pay fails the
step for good and nothing of it is written. The receipt that follows is an
ordinary step: the outside world still gets ``step_info().idempotency_key``.

Run it with ``stepline-worker --workflows examples.bank_transfer`` once the
``accounts`` table exists in Stepline's database (``create_accounts`` makes
it), or try it without any server: ``python -m examples.bank_transfer`` runs
three transfers in the testing kit (the real engine on SQLite, on virtual time)
and prints each ending and the balances.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline import Context, NonRetryableError, RetryPolicy, step_info, workflow
from stepline.worker.testing import WorkflowEnvironment

CREATE_ACCOUNTS = sa.text("CREATE TABLE IF NOT EXISTS accounts (id TEXT PRIMARY KEY, cents BIGINT NOT NULL)")
OPEN_ACCOUNT = sa.text("INSERT INTO accounts (id, cents) VALUES (:id, :cents)")
DEBIT = sa.text("UPDATE accounts SET cents = cents - :cents WHERE id = :id AND cents >= :cents")
CREDIT = sa.text("UPDATE accounts SET cents = cents + :cents WHERE id = :id")
BALANCES = sa.text("SELECT id, cents FROM accounts ORDER BY id")


class Transfer(BaseModel):
    """What the banking front end sends: move ``cents`` from ``source`` to ``target``."""

    source: str
    target: str
    cents: int = Field(gt=0)


async def create_accounts(conn: AsyncConnection, opening: dict[str, int]) -> None:
    """Make the ``accounts`` table in Stepline's database, with these opening balances."""
    await conn.execute(CREATE_ACCOUNTS)
    for account, cents in opening.items():
        await conn.execute(OPEN_ACCOUNT, {"id": account, "cents": cents})


async def move(conn: AsyncConnection, transfer: Transfer) -> int:
    """Debit, then credit, on the engine's connection: committed with the step's result, or not at all."""
    debited = await conn.execute(DEBIT, {"cents": transfer.cents, "id": transfer.source})
    if debited.rowcount != 1:
        # Nothing of this step commits, and it is not retried: the instance ends errored.
        raise NonRetryableError(f"{transfer.source} cannot pay {transfer.cents} cents")
    credited = await conn.execute(CREDIT, {"cents": transfer.cents, "id": transfer.target})
    if credited.rowcount != 1:
        raise NonRetryableError(f"no account {transfer.target!r}")  # the debit above rolls back too
    return transfer.cents


async def send_receipt(transfer: Transfer, moved: int) -> str:
    """An ordinary step: a mail service would get the idempotency key, stable across retries."""
    await asyncio.sleep(0.01)
    return f"receipt {step_info().idempotency_key[:11]}: {moved} cents {transfer.source} -> {transfer.target}"


@workflow("bank-transfer")
async def bank_transfer(ctx: Context, transfer: Transfer) -> str:
    """Move the money exactly once, then send the receipt."""
    moved = await ctx.transaction("move", move, transfer, retry=RetryPolicy(limit=3), timeout="5s")
    return await ctx.step("receipt", send_receipt, transfer, moved)


OPENING = {"alice": 1_000, "bob": 0}
TRANSFERS = [
    Transfer(source="alice", target="bob", cents=300),
    Transfer(source="bob", target="alice", cents=100),
    Transfer(source="bob", target="alice", cents=5_000),  # more than bob has: nothing moves
]


async def main() -> None:
    """Run the transfers in the testing kit and print how each ended, then the balances."""
    environment = WorkflowEnvironment()
    try:
        async with environment.connection() as conn:
            await create_accounts(conn, OPENING)
        for number, transfer in enumerate(TRANSFERS, start=1):
            run = await environment.start(bank_transfer, transfer, instance_id=f"transfer-{number}")
            ending = run.output if run.status == "complete" else (run.error or {}).get("message")
            print(f"transfer-{number}: {run.status}: {ending}")
        async with environment.connection() as conn:
            balances = {row.id: row.cents for row in await conn.execute(BALANCES)}
        print("balances: " + ", ".join(f"{account} {cents}" for account, cents in balances.items()))
    finally:
        environment.close()


if __name__ == "__main__":
    asyncio.run(main())
