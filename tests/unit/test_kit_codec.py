"""The testing kit with a payload codec: a team's codec seals what the real engine stores, on virtual time."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from stepline import AesGcmCodec, Context, RetryPolicy, Schedule, step_info, workflow
from stepline.worker.testing import WorkflowEnvironment

SECRET = "4111-KIT-SECRET"
KEY = base64.b64decode(AesGcmCodec.generate_key())


async def charge(card: str) -> dict[str, str]:
    return {"receipt": f"receipt-for-{card}"}


@workflow("kit-sealed")
async def kit_sealed(ctx: Context, card: str) -> dict[str, Any]:
    receipt = await ctx.step("charge", charge, card)
    await ctx.sleep("settle", "30 days")
    approval = await ctx.wait_for_event("approval", event_type="approved", timeout="90 days")
    return {"receipt": receipt, "approval": approval}


@pytest.fixture
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment(codec=AesGcmCodec({"k1": KEY}))
    yield environment
    environment.close()


async def test_the_kit_seals_with_the_given_codec_and_shows_values_opened(env: WorkflowEnvironment) -> None:
    run = await env.start(kit_sealed, SECRET, instance_id="sealed-1")
    assert run.status == "waiting"
    await run.send_event("approved", {"by": SECRET})

    assert run.status == "complete", run.error
    assert run.output == {"receipt": {"receipt": f"receipt-for-{SECRET}"}, "approval": {"by": SECRET}}
    assert run.entry("charge").result == {"receipt": f"receipt-for-{SECRET}"}
    assert run.entry("approval").result == {"by": SECRET}

    # At rest, in the kit's own store, every payload is the codec's envelope: no plaintext.
    async with env.connection() as conn:
        stored = [
            *(await conn.execute(sa.text("SELECT params, output FROM instances"))).one(),
            *(
                await conn.execute(sa.text("SELECT result FROM steps WHERE name IN ('charge', 'approval')"))
            ).scalars(),
            *(await conn.execute(sa.text("SELECT payload FROM events"))).scalars(),
        ]
    assert len(stored) == 5
    for value in stored:
        envelope = json.loads(value)
        assert (envelope["$codec"], envelope["key"]) == ("aes-gcm", "k1")
        assert SECRET not in value


KIT: list[WorkflowEnvironment] = []


async def sync_pages(pages: int) -> dict[str, Any]:
    """Its first attempt reports a checkpoint, then stalls past its heartbeat timeout (its worker died)."""
    info = step_info()
    if info.attempt == 1:
        info.heartbeat({"cursor": f"page-2-of-{SECRET}", "$codec": "a user's key"})
        await KIT[0].sleep("1 minute")
        await KIT[0].sleep("10 minutes")  # no heartbeat: the lease lapses, the attempt is stopped
        raise AssertionError("an attempt that lost its lease ran on")
    return {"resumed_from": info.last_heartbeat, "attempt": info.attempt}


@workflow("kit-sealed-heartbeats")
async def kit_sealed_heartbeats(ctx: Context, pages: int) -> dict[str, Any]:
    return await ctx.step(
        "sync",
        sync_pages,
        pages,
        timeout="1 hour",
        heartbeat_timeout="5 minutes",
        retry=RetryPolicy(limit=2, delay="30s"),
    )


async def test_heartbeat_details_are_sealed_at_rest_and_opened_for_the_next_attempt(
    env: WorkflowEnvironment,
) -> None:
    KIT[:] = [env]
    run = await env.start(kit_sealed_heartbeats, 5)
    assert run.status == "complete", run.error
    assert run.output == {
        "resumed_from": {"cursor": f"page-2-of-{SECRET}", "$codec": "a user's key"},
        "attempt": 2,
    }
    async with env.connection() as conn:
        (stored,) = (await conn.execute(sa.text("SELECT heartbeat FROM steps WHERE name = 'sync'"))).one()
    assert SECRET not in stored
    envelope = json.loads(stored)
    assert (envelope["$codec"], envelope["key"]) == ("aes-gcm", "k1")


@workflow("kit-sealed-report", schedules=[Schedule("0 * * * *", params={"card": SECRET})])
async def kit_sealed_report(ctx: Context, params: dict[str, str]) -> dict[str, str]:
    return await ctx.step("charge", charge, params["card"])


async def test_declared_schedule_params_are_sealed_at_rest_and_read_by_each_tick() -> None:
    environment = WorkflowEnvironment(codec=AesGcmCodec({"k1": KEY}), workflows=[kit_sealed_report])
    try:
        runs = await environment.run_schedules("2 hours")
        assert [run.output for run in runs] == [{"receipt": f"receipt-for-{SECRET}"}] * 2
        async with environment.connection() as conn:
            (stored,) = (await conn.execute(sa.text("SELECT params FROM schedules"))).one()
            instances = (await conn.execute(sa.text("SELECT params FROM instances"))).scalars().all()
        assert SECRET not in stored and json.loads(stored)["$codec"] == "aes-gcm"
        assert instances == [stored, stored]  # each tick's start carried the params as stored
    finally:
        environment.close()
