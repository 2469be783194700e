"""Workflows whose params, results, events, children and outputs carry a secret (the codec's tests)."""

from __future__ import annotations

from typing import Any

from stepline import Context, step_info, workflow


async def charge(card: str | None) -> dict[str, str]:
    """A step result that holds the secret."""
    return {"receipt": f"receipt-for-{card}"}


async def vault(card: str | None) -> str:
    return f"vaulted-{card}"


@workflow("sealed-order")
async def sealed_order(ctx: Context, params: Any) -> dict[str, Any]:
    """A step, an event wait, a child: each payload holds the params' card number."""
    card = params["card"] if params else None
    charged = await ctx.step("charge", charge, card)
    approval = await ctx.wait_for_event("approval", event_type="approved", timeout="1h")
    vaulted = await ctx.child("vault", "sealed-vault", {"card": card})
    return {"receipt": charged["receipt"], "approval": approval, "vault": vaulted}


@workflow("sealed-vault")
async def sealed_vault(ctx: Context, params: Any) -> dict[str, str]:
    return {"token": await ctx.step("store", vault, params["card"])}


BIG_BYTES = 50 * 1024 * 1024


async def make_big(size: int) -> dict[str, Any]:
    """A result of ``size`` characters: far over the offload threshold and the message limit."""
    return {"blob": "ab" * (size // 2), "tail": "end"}


async def measure(big: dict[str, Any]) -> dict[str, Any]:
    return {"length": len(big["blob"]), "tail": big["tail"], "head": big["blob"][:4]}


@workflow("big-result")
async def big_result(ctx: Context, size: int) -> dict[str, Any]:
    """A 50 MiB step result, read back by the next step after a wait (so from the database)."""
    big = await ctx.step("make", make_big, size)
    await ctx.wait_for_event("go", event_type="go", timeout="1h")
    return await ctx.step("measure", measure, big)


async def make_report(secret: str) -> dict[str, Any]:
    """A result of a few KiB: over an offload threshold of 1 KiB."""
    return {"secret": secret, "pad": "x" * 4096}


@workflow("read-back")
async def read_back(ctx: Context, secret: str) -> dict[str, Any]:
    """A recorded value, a result stored apart and an event: one of each payload the readers show."""
    stamp = ctx.now()
    report = await ctx.step("report", make_report, secret)
    got = await ctx.wait_for_event("go", event_type="go", timeout="1h")
    return {"at": stamp.isoformat(), "secret": report["secret"], "got": got}


LOOKALIKE = {"$codec": "aes-gcm", "key": "k1", "data": "not a ciphertext", "$payload": "not a reference"}
"""A user's value that has the keys of an envelope and of a reference: it must read back as itself."""


async def echo(value: Any) -> Any:
    return value


@workflow("lookalike")
async def lookalike(ctx: Context, params: Any) -> dict[str, Any]:
    """Params, a step result, an event, a child's params and output: each a dict with the reserved keys."""
    result = await ctx.step("echo", echo, {"$payload": params["$payload"]})
    event = await ctx.wait_for_event("event", event_type="lookalike", timeout="1h")
    child = await ctx.child("child", "lookalike-child", {"$codec": params["$codec"]})
    return {"$codec": "mine", "params": params, "result": result, "event": event, "child": child}


@workflow("lookalike-child")
async def lookalike_child(ctx: Context, params: Any) -> Any:
    return params


async def sync_pages(secret: str) -> str:
    """A long step that reports a checkpoint holding the secret, written before it ends."""
    info = step_info()
    info.heartbeat({"cursor": f"page-9-of-{secret}"})
    assert info.lease is not None
    await info.lease.flush()  # a real one heartbeats for hours: here, one written heartbeat is enough
    return "synced"


@workflow("checkpointed")
async def checkpointed(ctx: Context, secret: str) -> str:
    return await ctx.step("sync", sync_pages, secret, timeout="1 hour", heartbeat_timeout="1 minute")


def blob(size: int, tail: str) -> dict[str, Any]:
    """Params, an event payload or a child's params of ``size`` characters, ending with ``tail``."""
    return {"blob": "ab" * (size // 2), "tail": tail}


async def measure_blob(value: dict[str, Any]) -> dict[str, Any]:
    return {"length": len(value["blob"]), "tail": value["tail"], "head": value["blob"][:4]}


@workflow("big-inputs")
async def big_inputs(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    """Large params read by the first step, a large event, a child started with large params."""
    from_params = await ctx.step("measure-params", measure_blob, params)
    event = await ctx.wait_for_event("blob", event_type="blob", timeout="1h")
    from_event = await ctx.step("measure-event", measure_blob, event)
    size = len(event["blob"])
    from_child = await ctx.child("child", "big-child", blob(size, "child"))
    return {"params": from_params, "event": from_event, "child": from_child}


@workflow("big-child")
async def big_child(ctx: Context, params: dict[str, Any]) -> dict[str, Any]:
    return await ctx.step("measure", measure_blob, params)
