"""The testing kit with a payload codec: a team's codec seals what the real engine stores, on virtual time."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from stepline import AesGcmCodec, Context, workflow
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
