"""``ctx.transaction`` in the testing kit: the real engine's commit, on the kit's SQLite database."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from examples import bank_transfer as bank_transfer_example
from stepline import Context, RetryPolicy, step_info, workflow
from stepline.worker.testing import WorkflowEnvironment

CALLS: Counter[str] = Counter()
"""Runs of each transactional function's code, by step name."""
HOURLY = RetryPolicy(limit=2, delay="1 hour", backoff="constant")


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    CALLS.clear()
    environment = WorkflowEnvironment()
    async with environment.connection() as conn:
        await conn.execute(sa.text("CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER NOT NULL)"))
        await conn.execute(sa.text("INSERT INTO accounts VALUES ('alice', 100), ('bob', 0)"))
    yield environment
    environment.close()


async def move(conn: AsyncConnection, amount: int) -> int:
    """Move ``amount`` from alice to bob; fails after writing on its first attempt if the amount is odd."""
    CALLS[step_info().name] += 1
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance - :amount WHERE name = 'alice'"), {"amount": amount}
    )
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'"), {"amount": amount}
    )
    if amount % 2 and step_info().attempt == 1:
        raise ConnectionError("the ledger service hung up")
    bob = await conn.scalar(sa.text("SELECT balance FROM accounts WHERE name = 'bob'"))
    return int(bob)


async def commits_itself(conn: AsyncConnection, amount: int) -> None:
    await conn.execute(
        sa.text("UPDATE accounts SET balance = balance + :amount WHERE name = 'bob'"), {"amount": amount}
    )
    await conn.commit()


@workflow("kit-transfer")
async def kit_transfer(ctx: Context, amounts: list[int]) -> list[int]:
    return [await ctx.transaction("move", move, amount, retry=HOURLY) for amount in amounts]


@workflow("kit-commits-itself")
async def kit_commits_itself(ctx: Context, params: None) -> None:
    await ctx.transaction("sneaky", commits_itself, 5)


def plain(conn: AsyncConnection) -> None:
    """Not async: it could not await anything on the connection."""


@workflow("kit-not-async")
async def kit_not_async(ctx: Context, params: None) -> None:
    unchecked: Any = plain
    await ctx.transaction("plain", unchecked)


async def balances(env: WorkflowEnvironment) -> dict[str, int]:
    async with env.connection() as conn:
        rows = await conn.execute(sa.text("SELECT name, balance FROM accounts"))
        return {str(row.name): int(row.balance) for row in rows}


async def test_transfers_commit_with_their_steps_and_replays_do_not_run_them_again(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_transfer, [10, 20, 30])
    assert (run.status, run.output) == ("complete", [10, 30, 60])
    assert await balances(env) == {"alice": 40, "bob": 60}
    # The kit replays the workflow from its history for every step: the committed moves return
    # their stored results, and each function ran once.
    assert CALLS["move"] == 3
    assert [(entry.name, entry.status, entry.result) for entry in run.history] == [
        ("move", "succeeded", 10),
        ("move", "succeeded", 30),
        ("move", "succeeded", 60),
    ]


async def test_a_failed_attempt_rolls_its_writes_back_and_is_retried_on_virtual_time(
    env: WorkflowEnvironment,
) -> None:
    started = env.now
    run = await env.start(kit_transfer, [5])
    assert (run.status, run.output) == ("complete", [5])
    assert await balances(env) == {"alice": 95, "bob": 5}  # the failed attempt's move was rolled back
    assert CALLS["move"] == 2
    assert run.entry("move").attempts == 2
    assert (env.now - started).total_seconds() >= 3600


async def test_a_function_that_commits_the_transaction_itself_fails_the_step(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_commits_itself, None, instance_id="sneaky-1")
    assert run.status == "errored"
    entry = run.entry("sneaky")
    assert (entry.status, entry.attempts) == ("failed", 1)
    assert entry.error is not None and entry.error["type"] == "TransactionEndedError"
    assert entry.error["message"].startswith(
        "transactional step 'sneaky' of instance 'sneaky-1' (attempt 1) committed or rolled back"
    )
    assert await balances(env) == {"alice": 100, "bob": 5}  # what it committed itself stays


async def test_a_function_that_is_not_async_is_refused_naming_the_instance_and_step(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(kit_not_async, None, instance_id="plain-1")
    assert run.status == "errored"
    assert run.error is not None and run.error["type"] == "WorkflowDefinitionError"
    assert run.error["message"].startswith(
        "instance 'plain-1' of workflow 'kit-not-async', step 'plain': ctx.transaction needs an async "
        "function called as fn(conn, *args), not function"
    )


async def test_a_stub_of_a_transactional_step_gets_the_connection_too() -> None:
    async def fake_move(conn: AsyncConnection, amount: int) -> int:
        await conn.execute(sa.text("UPDATE accounts SET balance = balance + 1 WHERE name = 'bob'"))
        return -amount

    CALLS.clear()
    environment = WorkflowEnvironment(stubs={"move": fake_move})
    try:
        async with environment.connection() as conn:
            await conn.execute(sa.text("CREATE TABLE accounts (name TEXT PRIMARY KEY, balance INTEGER)"))
            await conn.execute(sa.text("INSERT INTO accounts VALUES ('alice', 100), ('bob', 0)"))
        run = await environment.start(kit_transfer, [10, 20])
        assert (run.status, run.output) == ("complete", [-10, -20])
        assert await balances(environment) == {"alice": 100, "bob": 2}
        assert CALLS["move"] == 0
    finally:
        environment.close()


async def test_the_bank_transfer_example_moves_each_amount_once_and_nothing_it_cannot_pay(
    capsys: pytest.CaptureFixture[str],
) -> None:
    await bank_transfer_example.main()  # as `python -m examples.bank_transfer` runs it
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[:2] for line in printed[:3]] == [
        ["transfer-1", " complete"],
        ["transfer-2", " complete"],
        ["transfer-3", " errored"],
    ]
    assert "bob cannot pay 5000 cents" in printed[2]
    assert printed[3] == "balances: alice 800, bob 200"

    environment = WorkflowEnvironment()
    try:
        async with environment.connection() as conn:
            await bank_transfer_example.create_accounts(conn, {"alice": 500, "bob": 0})
        first = bank_transfer_example.Transfer(source="alice", target="bob", cents=200)
        run = await environment.start(bank_transfer_example.bank_transfer, first, instance_id="t-1")
        assert run.status == "complete", run.error
        assert run.runs == Counter({"move": 1, "receipt": 1})
        assert run.entry("move").result == 200
        async with environment.connection() as conn:
            balances = {row.id: row.cents for row in await conn.execute(bank_transfer_example.BALANCES)}
        assert balances == {"alice": 300, "bob": 200}
    finally:
        environment.close()
