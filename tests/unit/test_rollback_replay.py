"""The rollback over hand-built histories: which compensations a replay asks for, and in which groups."""

from __future__ import annotations

import asyncio

from stepline import Context, workflow
from stepline.shared.history import History, StepRecord
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.worker.replay import Replay


async def book(what: str) -> str:
    return what


async def unbook(what: str, booking: str) -> None:
    return None


async def refuse() -> str:
    raise AssertionError("replay never runs step code")


@workflow("replayed-saga")
async def replayed_saga(ctx: Context, params: None) -> None:
    await ctx.step("flight", book, "flight", compensate=unbook)
    await asyncio.gather(
        ctx.step("hotel", book, "hotel", compensate=unbook), ctx.step("car", book, "car", compensate=unbook)
    )
    await ctx.step("pay", refuse)


def _step(name: str, position: int, *, batch: int | None = None, failed: bool = False) -> StepRecord:
    status = StepStatus.FAILED if failed else StepStatus.SUCCEEDED
    error = {"type": "NonRetryableError", "message": "card declined"} if failed else None
    detail = {"batch": batch} if batch is not None else None
    return StepRecord(
        name,
        1,
        position,
        StepKind.STEP,
        status,
        1,
        result=None if failed else name,
        error=error,
        detail=detail,
    )


def _history(*records: StepRecord) -> History:
    return History(
        instance_id="saga-1",
        workflow="replayed-saga",
        status=InstanceStatus.RUNNING,
        params=None,
        version=len(records),
        trace_context=None,
        steps={record.key: record for record in records},
    )


def test_parallel_steps_are_compensated_together_and_before_older_ones() -> None:
    history = _history(
        _step("flight", 1), _step("hotel", 2, batch=2), _step("car", 3, batch=2), _step("pay", 4, failed=True)
    )
    with Replay(replayed_saga, history) as replay:
        outcome = replay.start()
        assert (outcome.kind, outcome.is_running) == ("blocked", True)
        # The marker, then both compensations of the parallel pair at once; the flight's waits for them.
        assert [(entry.key, entry.kind) for entry in replay.new_entries] == [
            (("$rollback", 1), StepKind.ROLLBACK),
            (("$undo:hotel", 1), StepKind.STEP),
            (("$undo:car", 1), StepKind.STEP),
        ]
        undo_hotel = replay.calls[("$undo:hotel", 1)]
        assert (undo_hotel.fn, undo_hotel.args) == (unbook, ("hotel", "hotel"))


def test_once_every_compensation_ran_the_instance_ends_with_the_original_error() -> None:
    undone = [
        StepRecord(
            "$rollback", 1, 5, StepKind.ROLLBACK, StepStatus.SUCCEEDED, 1, result={"status": "errored"}
        ),
        StepRecord("$undo:hotel", 1, 6, StepKind.STEP, StepStatus.SUCCEEDED, 1),
        StepRecord("$undo:car", 1, 7, StepKind.STEP, StepStatus.FAILED, 4, error={"message": "no"}),
        StepRecord("$undo:flight", 1, 8, StepKind.STEP, StepStatus.SUCCEEDED, 1),
    ]
    history = _history(
        _step("flight", 1),
        _step("hotel", 2, batch=2),
        _step("car", 3, batch=2),
        _step("pay", 4, failed=True),
        *undone,
    )
    with Replay(replayed_saga, history) as replay:
        outcome = replay.start()
        assert outcome.kind == "raised" and not outcome.terminated
        assert "card declined" in str(outcome.error)
        assert [failure["step"] for failure in outcome.compensation_failures] == ["$undo:car"]
        assert replay.new_entries == []
