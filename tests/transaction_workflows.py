"""Workflows of the transactional-step tests: transfers between two rows of a user table.

The tests create the user's tables (``accounts``, and ``ledger``, one row per
committed move) in their own database, the one the workers use. Every move
writes through the connection ``ctx.transaction`` gives it, so what a test
reads there is what committed with the steps.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline import Context, RetryPolicy, step_info, workflow
from stepline.shared.history import format_key
from tests.support import db

QUICK = RetryPolicy(limit=3, delay="100ms", backoff="constant")

CALLS: Counter[str] = Counter()
"""Runs of transactional code in this process, by ``<instance id>/<step>``."""
RACES: dict[str, tuple[asyncio.Event, asyncio.Event]] = {}
"""Per instance id, set by a test: (the first run wrote, a second run started)."""

USER_TABLES = (
    "CREATE TABLE accounts (name VARCHAR(20) PRIMARY KEY, balance INTEGER NOT NULL)",
    "CREATE TABLE ledger (instance_id VARCHAR(200) NOT NULL, step VARCHAR(200) NOT NULL,"
    " amount INTEGER NOT NULL)",
    "INSERT INTO accounts (name, balance) VALUES ('alice', 100000), ('bob', 0)",
)


WITHDRAW = sa.text("UPDATE accounts SET balance = balance - :amount WHERE name = 'alice'")
DEPOSIT = sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'")
RECORD = sa.text("INSERT INTO ledger (instance_id, step, amount) VALUES (:instance_id, :step, :amount)")


async def create_user_tables(database_url: str) -> None:
    """The user's own tables, in the database the workers use: alice has 100000, bob nothing."""
    for statement in USER_TABLES:
        await db.rows(database_url, statement)


async def balances(database_url: str) -> dict[str, int]:
    found = await db.rows(database_url, "SELECT name, balance FROM accounts")
    return {str(row["name"]): int(row["balance"]) for row in found}


async def ledger(database_url: str, instance_id: str) -> list[tuple[str, int]]:
    """The moves of an instance that committed: (step, amount), in step order."""
    found = await db.rows(
        database_url, "SELECT step, amount FROM ledger WHERE instance_id = %s ORDER BY amount", instance_id
    )
    return [(str(row["step"]), int(row["amount"])) for row in found]


class Transfer(BaseModel):
    """Amounts to move from alice to bob, one transactional step each."""

    amounts: list[int]
    fail_first: bool = False
    """Each move fails its first attempt, after writing."""
    marks: str | None = None
    """A directory where each run of a move leaves a file ``<pid>.<uuid>[.hold]``."""
    hold_at: list[int] = []
    """The moves (1 for the first) whose first run blocks in its transaction: the test kills its worker."""


async def _write_move(conn: AsyncConnection, amount: int) -> str:
    info = step_info()
    step = format_key((info.name, info.occurrence))
    CALLS[f"{info.instance_id}/{step}"] += 1
    params = {"amount": amount, "instance_id": info.instance_id, "step": step}
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance - :amount WHERE name = 'alice'"), params
    )
    await conn.execute(sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'"), params)
    await conn.execute(
        sa.text("INSERT INTO ledger (instance_id, step, amount) VALUES (:instance_id, :step, :amount)"),
        params,
    )
    return step


async def move(conn: AsyncConnection, plan: Transfer, amount: int) -> int:
    """Move ``amount`` from alice to bob; returns it."""
    await _write_move(conn, amount)
    info = step_info()
    if plan.fail_first and info.attempt == 1:
        raise ConnectionError(f"the ledger hung up after moving {amount}")
    if plan.marks is not None:
        await _mark(Path(plan.marks), holds=info.occurrence in plan.hold_at)
    return amount


async def _mark(marks: Path, *, holds: bool) -> None:
    """Leave this run's file; the first run of a held move then blocks, its transaction open."""
    info = step_info()
    prefix = f"{info.instance_id.replace('/', '_')}.{info.occurrence}"
    first = not any(marks.glob(f"{prefix}.*"))  # noqa: ASYNC240  # a few files, in a test
    suffix = ".hold" if holds and first else ""
    (marks / f"{prefix}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}").touch()
    if suffix:
        await asyncio.sleep(3600)  # the test SIGKILLs this worker now


@workflow("transfer")
async def transfer(ctx: Context, plan: Transfer) -> list[int]:
    return [await ctx.transaction("move", move, plan, amount, retry=QUICK) for amount in plan.amounts]


async def racing_move(conn: AsyncConnection, amount: int) -> int:
    """The first run writes and waits for a second run of the same attempt to start, then returns."""
    wrote, second_started = RACES[step_info().instance_id]
    if wrote.is_set():
        second_started.set()
        await _write_move(conn, amount)  # waits for the first run's row locks: it commits first
        return amount
    await _write_move(conn, amount)
    wrote.set()
    await second_started.wait()
    return amount


@workflow("racing-transfer")
async def racing_transfer(ctx: Context, amount: int) -> int:
    return await ctx.transaction("move", racing_move, amount)


async def commits_itself(conn: AsyncConnection, amount: int) -> None:
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'"), {"amount": amount}
    )
    await conn.commit()


async def rolls_back_itself(conn: AsyncConnection, amount: int) -> None:
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'"), {"amount": amount}
    )
    await conn.rollback()


@workflow("ends-its-transaction")
async def ends_its_transaction(ctx: Context, how: str) -> None:
    await ctx.transaction("sneaky", commits_itself if how == "commit" else rolls_back_itself, 7, retry=QUICK)


@workflow("transaction-not-callable")
async def transaction_not_callable(ctx: Context, params: None) -> None:
    not_a_function: Any = "UPDATE accounts SET balance = 0"
    await ctx.transaction("wipe", not_a_function)


async def slow_move(conn: AsyncConnection, amount: int) -> int:
    """Writes, then outlasts the step's timeout on its first attempt (on PostgreSQL, in a query)."""
    await _write_move(conn, amount)
    if step_info().attempt == 1:
        if conn.dialect.name == "postgresql":
            await conn.execute(sa.text("SELECT pg_sleep(60)"))
        await asyncio.sleep(60)
    return amount


@workflow("slow-transfer")
async def slow_transfer(ctx: Context, amount: int) -> int:
    return await ctx.transaction("move", slow_move, amount, timeout="1s", retry=QUICK)
