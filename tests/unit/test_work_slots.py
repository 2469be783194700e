"""WorkSlots: a freed slot goes to running instances' work before a start; nothing leaks on cancel."""

from __future__ import annotations

import asyncio

import pytest

from stepline.worker.work_slots import WorkSlots


async def test_a_freed_slot_goes_to_waiting_running_work_before_earlier_starts() -> None:
    slots = WorkSlots(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def take(name: str, *, is_start: bool) -> None:
        async with slots.hold(is_start=is_start):
            order.append(name)
            if name == "first":
                await gate.wait()

    tasks = [asyncio.create_task(take("first", is_start=True))]
    await asyncio.sleep(0)
    for name, is_start in (("start-1", True), ("start-2", True), ("wake", False), ("step", False)):
        tasks.append(asyncio.create_task(take(name, is_start=is_start)))
        await asyncio.sleep(0)
    assert slots.waiting == (2, 2)
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["first", "wake", "step", "start-1", "start-2"]
    assert slots.waiting == (0, 0)


async def test_a_start_takes_a_free_slot_only_when_no_running_work_waits() -> None:
    slots = WorkSlots(2)
    async with slots.hold(is_start=True), slots.hold(is_start=False):
        waiting = asyncio.create_task(_enter(slots, is_start=False))
        await asyncio.sleep(0)
        assert slots.waiting == (1, 0)
    await waiting
    # Both free again: a start goes straight in.
    await asyncio.wait_for(_enter(slots, is_start=True), timeout=1)


async def test_a_cancelled_waiter_leaves_no_slot_taken() -> None:
    slots = WorkSlots(1)
    async with slots.hold(is_start=False):
        cancelled = asyncio.create_task(_enter(slots, is_start=True))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert slots.waiting == (0, 0)
    await asyncio.wait_for(_enter(slots, is_start=False), timeout=1)


async def test_a_waiter_cancelled_as_its_slot_is_handed_over_passes_it_on() -> None:
    slots = WorkSlots(1)
    held = slots.hold(is_start=False)
    await held.__aenter__()
    handed = asyncio.create_task(_enter(slots, is_start=False))
    after = asyncio.create_task(_enter(slots, is_start=True))
    await asyncio.sleep(0)
    assert slots.waiting == (1, 1)
    await held.__aexit__(None, None, None)  # hands the slot to `handed`, which has not run since
    handed.cancel()
    await asyncio.wait_for(after, timeout=1)
    assert handed.cancelled()


def test_a_worker_needs_a_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        WorkSlots(0)


async def _enter(slots: WorkSlots, *, is_start: bool) -> None:
    async with slots.hold(is_start=is_start):
        pass
