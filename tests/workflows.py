"""Workflows the tests run; every step records each real execution in ``side_effects``."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosqlite
import psycopg
from pydantic import BaseModel

from stepline import Concurrency, Context, NonRetryableError, RetryAfter, RetryPolicy, step_info, workflow
from stepline.shared.db.engine import ClosingSqliteConnection, is_sqlite, sqlite_path

SIDE_EFFECTS_URL = "STEPLINE_TEST_SIDE_EFFECTS_URL"
"""Where step code records its runs; the workers' own database (STEPLINE_DATABASE_URL) when unset."""

FAST_RETRY = RetryPolicy(limit=3, delay="100ms", backoff="constant")


async def record(note: str = "") -> int:
    """Record one execution of the running step; returns how many times it ran before."""
    info = step_info()
    step = info.name if info.occurrence == 1 else f"{info.name}#{info.occurrence}"
    url = os.environ.get(SIDE_EFFECTS_URL) or os.environ["STEPLINE_DATABASE_URL"]
    if is_sqlite(url):
        return await _record_sqlite(url, info.instance_id, step, info.attempt, note)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM side_effects WHERE instance_id = %s AND step = %s",
            (info.instance_id, step),
        )
        row = await cursor.fetchone()
        await conn.execute(
            "INSERT INTO side_effects (instance_id, step, attempt, worker_pid, note)"
            " VALUES (%s, %s, %s, %s, %s)",
            (info.instance_id, step, info.attempt, os.getpid(), note),
        )
    return int(row[0]) if row else 0


async def _record_sqlite(url: str, instance_id: str, step: str, attempt: int, note: str) -> int:
    # A step cancelled mid-insert (a worker stopping) must not leave the write lock held: see
    # ClosingSqliteConnection.
    async with aiosqlite.connect(sqlite_path(url), timeout=30, factory=ClosingSqliteConnection) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM side_effects WHERE instance_id = ? AND step = ?", (instance_id, step)
        )
        row = await cursor.fetchone()
        await conn.execute(
            "INSERT INTO side_effects (instance_id, step, attempt, worker_pid, note) VALUES (?, ?, ?, ?, ?)",
            (instance_id, step, attempt, os.getpid(), note),
        )
        await conn.commit()
    return int(row[0]) if row else 0


# ---------------------------------------------------------------- sequence


class Numbers(BaseModel):
    a: int
    b: int


class Total(BaseModel):
    value: int


async def add(a: int, b: int) -> Total:
    await record()
    return Total(value=a + b)


def multiply(total: Total, factor: int) -> int:
    # A plain function: it runs in a thread, and step_info() still works there.
    assert step_info().name == "multiply"
    return total.value * factor


async def describe(value: int) -> str:
    await record()
    return f"result={value}"


@workflow("sequence")
async def sequence(ctx: Context, params: Numbers) -> dict[str, Any]:
    total = await ctx.step("add", add, params.a, params.b)
    product = await ctx.step("multiply", multiply, total, 10)
    text = await ctx.step("describe", describe, product)
    return {"total": total.value, "product": product, "text": text}


BODY_RUNS: Counter[str] = Counter()
"""How often each instance's workflow function began to run in this process: its replays."""


@workflow("counted")
async def counted(ctx: Context, params: None) -> str:
    BODY_RUNS[ctx.instance_id] += 1
    first = await ctx.step("one", describe, 1)
    second = await ctx.step("two", describe, 2)
    return f"{first} {second} {await ctx.step('three', describe, 3)}"


# ---------------------------------------------------------------- retries and failures


class Flaky(BaseModel):
    fail_times: int
    limit: int = 3
    delay: str = "50ms"


async def flaky_call(fail_times: int) -> str:
    await record()
    attempt = step_info().attempt
    if attempt <= fail_times:
        raise ConnectionError(f"transient failure on attempt {attempt}")
    return f"ok on attempt {attempt}"


@workflow("flaky")
async def flaky(ctx: Context, params: Flaky) -> str:
    return await ctx.step(
        "call",
        flaky_call,
        params.fail_times,
        retry=RetryPolicy(limit=params.limit, delay=params.delay, backoff="constant"),
    )


class RateLimited(BaseModel):
    wait_s: float | None = None
    """The step answers attempt 1 with RetryAfter(wait_s)..."""
    until_in_s: float | None = None
    """... or with RetryAfter(until=now + until_in_s, to the millisecond)..."""
    header: str | None = None
    """... or with RetryAfter.from_header(header)."""
    limit: int = 3


async def rate_limited_call(params: RateLimited) -> str:
    """An API that answers its first call with HTTP 429 and a Retry-After."""
    await record()
    attempt = step_info().attempt
    if attempt > 1:
        return f"ok on attempt {attempt}"
    if params.header is not None:
        raise RetryAfter.from_header(params.header)
    wait_s, until_in_s = params.wait_s, params.until_in_s
    if until_in_s is None:
        raise RetryAfter(wait_s, message="429 Too Many Requests")
    moment = datetime.now(UTC) + timedelta(seconds=until_in_s)
    raise RetryAfter(until=moment.replace(microsecond=moment.microsecond // 1000 * 1000))


@workflow("rate-limited")
async def rate_limited(ctx: Context, params: RateLimited) -> str:
    # The policy's own back-off is short: a retry that waits longer waited for the step's RetryAfter.
    policy = RetryPolicy(limit=params.limit, delay="50ms", backoff="constant", max_delay="100ms")
    return await ctx.step("call", rate_limited_call, params, retry=policy)


async def refuse() -> str:
    await record()
    raise NonRetryableError("card declined")


@workflow("non-retryable")
async def non_retryable(ctx: Context, params: None) -> str:
    return await ctx.step("charge", refuse, retry=FAST_RETRY)


async def refuse_then_recover() -> str:
    await record()
    raise NonRetryableError("card declined")


async def compensate() -> str:
    await record()
    return "refunded"


@workflow("catches-failure")
async def catches_failure(ctx: Context, params: None) -> str:
    from stepline import StepFailedError

    try:
        await ctx.step("charge", refuse_then_recover)
    except StepFailedError as exc:
        return await ctx.step("compensate", compensate) + f" after: {exc.error_message}"
    return "charged"


async def slow_first(seconds: float) -> str:
    await record()
    if step_info().attempt == 1:
        await asyncio.sleep(seconds)
    return f"finished on attempt {step_info().attempt}"


@workflow("times-out")
async def times_out(ctx: Context, params: None) -> str:
    return await ctx.step("slow", slow_first, 5.0, timeout="300ms", retry=FAST_RETRY)


class Opaque:
    """Not JSON-serialisable."""


async def returns_opaque() -> Opaque:
    await record()
    return Opaque()


@workflow("unserialisable")
async def unserialisable(ctx: Context, params: None) -> str:
    await ctx.step("make-opaque", returns_opaque)
    return "unreachable"


async def nul_text() -> str:
    await record()
    return "before\x00after"


@workflow("nul-result")
async def nul_result(ctx: Context, params: None) -> str:
    return await ctx.step("nul", nul_text)


# ---------------------------------------------------------------- sleeps


class Nap(BaseModel):
    duration: str


async def after_nap() -> str:
    await record()
    return "awake"


@workflow("sleeper")
async def sleeper(ctx: Context, params: Nap) -> dict[str, str]:
    before = ctx.now()
    await ctx.sleep("nap", params.duration)
    woke = await ctx.step("after", after_nap)
    return {"before": before.isoformat(), "woke": woke}


@workflow("counted-nap")
async def counted_nap(ctx: Context, params: None) -> str:
    BODY_RUNS[ctx.instance_id] += 1
    await ctx.sleep("nap", "1s")
    return await ctx.step("after", after_nap)


@workflow("counted-late-nap")
async def counted_late_nap(ctx: Context, params: None) -> str:
    BODY_RUNS[ctx.instance_id] += 1
    await ctx.step("before", describe, 1)
    await ctx.sleep("nap", "1s")
    return await ctx.step("after", after_nap)


class Alarm(BaseModel):
    wake_at: datetime


@workflow("sleep-until")
async def sleep_until(ctx: Context, params: Alarm) -> str:
    await ctx.sleep_until("alarm", params.wake_at)
    return await ctx.step("after", after_nap)


# ---------------------------------------------------------------- parallel


async def branch(label: str) -> str:
    await record()
    return label.upper()


@workflow("parallel")
async def parallel(ctx: Context, params: None) -> list[str]:
    left, right = await asyncio.gather(ctx.step("left", branch, "l"), ctx.step("right", branch, "r"))
    return [left, right, await ctx.step("join", branch, left + right)]


# ---------------------------------------------------------------- crash


async def block_first_time() -> str:
    """Blocks forever on its first execution (the test kills the worker); returns after."""
    runs_before = await record()
    if runs_before == 0:
        await asyncio.sleep(3600)
    return "done"


@workflow("crash")
async def crash(ctx: Context, params: None) -> str:
    first = await ctx.step("before", branch, "x")
    blocked = await ctx.step("blocking", block_first_time)
    last = await ctx.step("after", branch, "y")
    return first + blocked + last


# ---------------------------------------------------------------- races and deploys


async def slow_step(seconds: float) -> str:
    await record()
    await asyncio.sleep(seconds)
    return "slow done"


@workflow("slow-pair")
async def slow_pair(ctx: Context, params: None) -> str:
    first = await ctx.step("slow", slow_step, 1.0)
    second = await ctx.step("next", branch, "n")
    return f"{first}/{second}"


async def slow_until_run_twice() -> str:
    """Runs until a second run of itself started (or 30 s): a duplicate then always meets it running."""
    await record()
    info = step_info()
    for _ in range(300):
        if await _runs_of(info.instance_id, info.name) >= 2:
            break
        await asyncio.sleep(0.1)
    return "slow done"


@workflow("duplicated-pair")
async def duplicated_pair(ctx: Context, params: None) -> str:
    """slow-pair whose slow step outlasts however long a loaded machine takes to send its duplicate."""
    first = await ctx.step("slow", slow_until_run_twice)
    second = await ctx.step("next", branch, "n")
    return f"{first}/{second}"


@workflow("quick-then-slow")
async def quick_then_slow(ctx: Context, params: None) -> str:
    """The slow step outlasts the tests' sweep_after (1 s) while a worker runs it as a local step."""
    first = await ctx.step("quick", branch, "q")
    second = await ctx.step("slow", slow_step, 3.0)
    return f"{first}/{second}/{await ctx.step('after', branch, 'a')}"


@workflow("evolving")
async def evolving(ctx: Context, params: None) -> str:
    """Version 1; tests deploy a changed version under the same name while it sleeps."""
    first = await ctx.step("a", branch, "a")
    await ctx.sleep("pause", "1 day")
    return first + await ctx.step("b", branch, "b")


async def gateway_timeout() -> str:
    """Raises its own TimeoutError (a client library's), which is not a step timeout."""
    await record()
    if step_info().attempt == 1:
        raise TimeoutError("payment gateway did not answer in time")
    return "paid"


@workflow("own-timeout")
async def own_timeout(ctx: Context, params: None) -> str:
    return await ctx.step("charge", gateway_timeout, retry=FAST_RETRY, timeout="30s")


# ---------------------------------------------------------------- events


class Approval(BaseModel):
    timeout: str | None = None


@workflow("approval")
async def approval(ctx: Context, params: Approval) -> dict[str, Any]:
    await ctx.step("submit", branch, "submitted")
    decision = await ctx.wait_for_event("decision", event_type="approved", timeout=params.timeout)
    after = await ctx.step("act", branch, str(decision))
    return {"decision": decision, "after": after}


@workflow("approval-or-timeout")
async def approval_or_timeout(ctx: Context, params: Approval) -> str:
    from stepline import EventTimeoutError

    try:
        decision = await ctx.wait_for_event("decision", event_type="approved", timeout=params.timeout)
    except EventTimeoutError as exc:
        return await ctx.step("escalate", branch, "escalated") + f" ({exc})"
    return f"approved: {decision}"


@workflow("two-approvals")
async def two_approvals(ctx: Context, params: None) -> list[Any]:
    first = await ctx.wait_for_event("first", event_type="approved")
    second = await ctx.wait_for_event("second", event_type="approved")
    return [first, second]


# ---------------------------------------------------------------- parallel branches


@workflow("two-slow-branches")
async def two_slow_branches(ctx: Context, params: None) -> list[str]:
    left, right = await asyncio.gather(ctx.step("left", slow_step, 1.0), ctx.step("right", slow_step, 1.0))
    return [left, right]


@workflow("failing-branch")
async def failing_branch(ctx: Context, params: Flaky) -> list[str]:
    retried, refused = await asyncio.gather(
        ctx.step("flaky", flaky_call, params.fail_times, retry=FAST_RETRY),
        ctx.step("refused", refuse),
    )
    return [retried, refused]


@workflow("retried-branch")
async def retried_branch(ctx: Context, params: Flaky) -> list[str]:
    return list(
        await asyncio.gather(
            ctx.step("flaky", flaky_call, params.fail_times, retry=FAST_RETRY),
            ctx.step("steady", branch, "steady"),
        )
    )


# ---------------------------------------------------------------- children


@workflow("parent")
async def parent(ctx: Context, params: Numbers) -> dict[str, Any]:
    child_output = await ctx.child("compute", sequence, params)
    return {"child": child_output, "after": await ctx.step("after", branch, "p")}


@workflow("parent-of-failure")
async def parent_of_failure(ctx: Context, params: None) -> str:
    from stepline import StepFailedError

    try:
        await ctx.child("charge", "non-retryable", None)
    except StepFailedError as exc:
        return f"caught: {exc.error_message}"
    return "child succeeded"


@workflow("parent-of-sleeper")
async def parent_of_sleeper(ctx: Context, params: None) -> Any:
    return await ctx.child("nap", sleeper, Nap(duration="1 day"))


# ---------------------------------------------------------------- telemetry


@workflow("traced")
async def traced(ctx: Context, params: None) -> list[str]:
    first = await ctx.step("flaky", flaky_call, 1, retry=FAST_RETRY)
    await ctx.sleep("nap", "300ms")
    left, right = await asyncio.gather(ctx.step("left", slow_step, 0.5), ctx.step("right", slow_step, 0.5))
    return [first, left, right]


# ---------------------------------------------------------------- hostile input


class Decision(BaseModel):
    approved: bool
    by: str


@workflow("typed-approval")
async def typed_approval(ctx: Context, params: None) -> str:
    decision = await ctx.wait_for_event("decision", event_type="decided", payload_type=Decision)
    return f"{decision.by}: {'yes' if decision.approved else 'no'}"


@workflow("typed-approval-late")
async def typed_approval_late(ctx: Context, params: None) -> str:
    await ctx.step("prepare", slow_step, 0.5)
    decision = await ctx.wait_for_event("decision", event_type="decided", payload_type=Decision)
    return f"{decision.by}: {'yes' if decision.approved else 'no'}"


async def huge_result(size: int) -> str:
    await record()
    return "x" * size


@workflow("huge-result")
async def huge_result_workflow(ctx: Context, params: int) -> str:
    return await ctx.step("make-huge", huge_result, params)


@workflow("long-timeout")
async def long_timeout(ctx: Context, params: None) -> str:
    return await ctx.step("forever", branch, "x", timeout="2 hours")


# ---------------------------------------------------------------- text that must not break output


async def fail_with(text: str) -> str:
    raise NonRetryableError(text)


@workflow("odd-text")
async def odd_text(ctx: Context, params: str) -> str:
    """Fails with ``params`` as its step's error message: text `stepline` must print on one line."""
    return await ctx.step("say [bold]it[/bold]", fail_with, params)


@workflow("odd-child")
async def odd_child(ctx: Context, params: str) -> Any:
    """Starts a child under the id ``params``."""
    return await ctx.child("compute", "sequence", {"a": 1, "b": 1}, instance_id=params)


# ---------------------------------------------------------------- a fan-out planned by a long transaction


@workflow("fan-out-on-event")
async def fan_out_on_event(ctx: Context, params: int) -> int:
    # The transaction that takes the event replays under the instance lock and plans every leaf at once.
    await ctx.wait_for_event("go", event_type="go")
    leaves = await asyncio.gather(*(ctx.step("leaf", branch, str(index)) for index in range(params)))
    return len(leaves)


# ---------------------------------------------------------------- kit and engine alike


@workflow("parity-kept-events")
async def parity_kept_events(ctx: Context, params: None) -> str:
    await ctx.wait_for_event("go", event_type="go")
    decision = await ctx.wait_for_event("decision", event_type="decided", payload_type=Decision)
    extra = await ctx.wait_for_event("extra", event_type="decided")
    return f"{decision.by} then {extra}"


@workflow("parity-child")
async def parity_child(ctx: Context, params: None) -> str:
    return str(await ctx.wait_for_event("sign-off", event_type="signed"))


@workflow("parity-parent")
async def parity_parent(ctx: Context, params: None) -> str:
    return await ctx.child("approve", parity_child, None)


@workflow("parity-event-timeout")
async def parity_event_timeout(ctx: Context, params: None) -> str:
    from stepline import EventTimeoutError

    try:
        await ctx.wait_for_event("decision", event_type="approved", timeout="1 hour")
    except EventTimeoutError as exc:
        return f"timed out: {exc}"
    return "approved"


# ---------------------------------------------------------------- flow control: instance concurrency


class Lane(BaseModel):
    lane: str = "a"
    work_ms: int = 0


async def lane_work(work_ms: int) -> str:
    await record()
    await asyncio.sleep(work_ms / 1000)  # the work itself (a slow call), not a synchronisation
    return "done"


@workflow("per-lane", concurrency=Concurrency(2, key=lambda params: params.lane))
async def per_lane(ctx: Context, params: Lane) -> str:
    """At most two at once per lane: one step of ``work_ms``."""
    return await ctx.step("work", lane_work, params.work_ms)


@workflow("gate", concurrency=Concurrency(1, key=lambda params: params.lane))
async def gate(ctx: Context, params: Lane) -> str:
    """One at a time per lane, each holding its slot until it is sent "go"."""
    await ctx.wait_for_event("go", event_type="go")
    return params.lane


@workflow("gate-newest", concurrency=Concurrency(1, on_limit="cancel-newest"))
async def gate_newest(ctx: Context, params: Lane) -> str:
    """One at a time; a start while one runs is cancelled."""
    await ctx.wait_for_event("go", event_type="go")
    return params.lane


@workflow("gate-oldest", concurrency=Concurrency(1, key=lambda params: params.lane, on_limit="cancel-oldest"))
async def gate_oldest(ctx: Context, params: Lane) -> str:
    """One at a time per lane; a start while one runs cancels it."""
    await ctx.wait_for_event("go", event_type="go")
    return params.lane


def _broken_key(params: Lane) -> str:
    if params.lane == "raise":
        raise KeyError("no customer")
    return 42 if params.lane == "int" else params.lane  # type: ignore[return-value]


@workflow("broken-key", concurrency=Concurrency(1, key=_broken_key))
async def broken_key(ctx: Context, params: Lane) -> str:
    """A key function that raises (lane "raise") or returns an int (lane "int")."""
    return params.lane


# ---------------------------------------------------------------- long steps (heartbeats)


async def crunch(chunks: int) -> dict[str, int]:
    """Works chunk by chunk, checkpointed by heartbeats; attempt 1 hangs after chunk 3 (its worker dies)."""
    info = step_info()
    start = int(info.last_heartbeat or 0)
    await record(f"from {start}")
    for done in range(start + 1, chunks + 1):
        await asyncio.sleep(0.05)
        info.heartbeat(done)
        if info.attempt == 1 and done == 3:
            await asyncio.sleep(3600)
    return {"chunks": chunks, "resumed_from": start, "attempt": info.attempt}


@workflow("long-crunch")
async def long_crunch(ctx: Context, chunks: int) -> dict[str, int]:
    # A timeout far past the 25 minutes a step holding its message may ask for.
    return await ctx.step(
        "crunch", crunch, chunks, timeout="2 hours", heartbeat_timeout="2s", retry=FAST_RETRY
    )


async def outlived() -> str:
    """Attempt 1 runs on until attempt 2 has started (its lease was taken over), then returns a result."""
    info = step_info()
    await record()
    if info.attempt == 1:
        await _until_runs(info.instance_id, "outlived", 2)
        await record("stale attempt returns")
    else:
        await _until_runs(info.instance_id, "outlived", 3)
    return f"attempt {info.attempt}"


async def _until_runs(instance_id: str, step: str, count: int) -> None:
    for _ in range(1200):  # a minute at most
        if await _runs_of(instance_id, step) >= count:
            return
        await asyncio.sleep(0.05)


async def _runs_of(instance_id: str, step: str) -> int:
    url = os.environ.get(SIDE_EFFECTS_URL) or os.environ["STEPLINE_DATABASE_URL"]
    query = "SELECT count(*) FROM side_effects WHERE instance_id = %s AND step = %s"
    if is_sqlite(url):
        async with aiosqlite.connect(sqlite_path(url), timeout=30) as lite:
            cursor = await lite.execute(query.replace("%s", "?"), (instance_id, step))
            found = await cursor.fetchone()
            return int(found[0]) if found else 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        row = await (await conn.execute(query, (instance_id, step))).fetchone()
    return int(row[0]) if row else 0


@workflow("lease-takeover")
async def lease_takeover(ctx: Context, params: None) -> str:
    return await ctx.step("outlived", outlived, heartbeat_timeout="60s", retry=FAST_RETRY)


# ---------------------------------------------------------------- fan-out


class FanOut(BaseModel):
    width: int


async def fan_branch(value: int) -> int:
    await record()
    return 2 * value


@workflow("fan-out")
async def fan_out(ctx: Context, params: FanOut) -> dict[str, int]:
    """``width`` parallel steps gathered at once, then one more step on their sum."""
    values = await asyncio.gather(*(ctx.step("branch", fan_branch, n) for n in range(params.width)))
    total = await ctx.step("total", fan_branch, sum(values))
    return {"count": len(values), "total": total}


# ---------------------------------------------------------------- long workflows


class LongChain(BaseModel):
    steps: int


CHAIN_RUNS: Counter[tuple[str, int]] = Counter()
"""Runs of each ``long-chain`` step in this process, by (instance, step index): in-process workers count here.

The steps do not record into ``side_effects``: a connection per step would make a chain of
thousands of steps slow for no gain, and in-process tests can count in memory.
"""


async def tally(index: int) -> int:
    CHAIN_RUNS[(step_info().instance_id, index)] += 1
    return index + 1


@workflow("long-chain")
async def long_chain(ctx: Context, params: LongChain) -> int:
    """``steps`` trivial steps in a row, each given the last one's result (its own index)."""
    value = 0
    for _ in range(params.steps):
        value = await ctx.step("tally", tally, value)
    return value
