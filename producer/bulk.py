"""Bulk control: one control action on every instance a selection picks, a batch per transaction.

Each instance gets the same rule as the single-id action (``stepline.producer.control``):
the batch's transaction locks it, checks it still fits the selection, and runs
the rule; an instance that no longer fits, or that the rule refuses, is skipped
with the reason, and the others of its batch still change.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Literal

from pydantic import BaseModel

from stepline.producer import control
from stepline.shared.db.bulk_statements import InstanceSelection, SelectedInstance
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import InstanceNotFoundError, InvalidStateError
from stepline.shared.states import InstanceStatus

BulkAction = Literal["pause", "resume", "terminate", "restart"]
BULK_ACTIONS: tuple[BulkAction, ...] = ("pause", "resume", "terminate", "restart")
SAMPLE_SIZE = 10  # ids a dry run shows

Rule = Callable[[Transaction, str], Awaitable[list[OutboxRow]]]
Connect = Callable[[], AbstractAsyncContextManager[Transaction]]
Publish = Callable[[list[OutboxRow]], Awaitable[None]]
Progress = Callable[[int, int], None]


class BulkOutcome(BaseModel):
    """What a bulk action did (or, in a dry run, would look at).

    Attributes:
        action: pause, resume, terminate or restart.
        dry_run: nothing was changed.
        matched: instances the selection picked.
        changed: instances the action changed.
        skipped: why the others were left alone -> how many.
        sample: in a dry run, the first picked ids (by id).
    """

    action: BulkAction
    dry_run: bool
    matched: int
    changed: int
    skipped: dict[str, int]
    sample: list[str]


def rule_of(
    action: BulkAction, *, payload_limit: int, rollback: bool = False, children: bool = False
) -> Rule:
    """The single-id rule of ``action``, as the ``Client`` methods run it (with terminate's options)."""
    if (rollback or children) and action != "terminate":
        raise ValueError(f"rollback and children are options of terminate, not of {action}")
    if action == "pause":

        async def pause(tx: Transaction, instance_id: str) -> list[OutboxRow]:
            await control.pause(tx, instance_id)
            return []

        return pause
    if action == "resume":
        return lambda tx, instance_id: control.resume(tx, instance_id, limit=payload_limit)
    if action == "terminate":
        return lambda tx, instance_id: control.terminate(
            tx, instance_id, limit=payload_limit, rollback=rollback, children=children
        )
    if action == "restart":
        return lambda tx, instance_id: control.restart(tx, instance_id, limit=payload_limit)
    raise ValueError(f"unknown bulk action {action!r}: use one of {', '.join(BULK_ACTIONS)}")


class BulkRun:
    """One bulk action over a selection, read a batch at a time (keyset by id)."""

    def __init__(
        self, selection: InstanceSelection, *, reading: Connect, writing: Connect, batch_size: int
    ) -> None:
        if selection.is_everything:
            raise ValueError(
                "a bulk action needs at least one filter (workflow, status, created after, build, held)"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self._selection = selection
        self._reading = reading
        self._writing = writing
        self._batch_size = batch_size

    async def dry_run(self, action: BulkAction) -> BulkOutcome:
        """How many instances the selection picks now, and the first few ids; nothing changes."""
        matched, sample = 0, list[str]()
        async for batch in self._batches():
            matched += len(batch)
            sample += [instance.id for instance in batch][: SAMPLE_SIZE - len(sample)]
        return BulkOutcome(action=action, dry_run=True, matched=matched, changed=0, skipped={}, sample=sample)

    async def apply(
        self, action: BulkAction, rule: Rule, publish: Publish, progress: Progress | None = None
    ) -> BulkOutcome:
        """Run ``rule`` on each picked instance, one transaction per batch, publishing each batch's rows."""
        total = await self._count()
        done = changed = 0
        skipped: Counter[str] = Counter()
        async for batch in self._batches():
            rows: list[OutboxRow] = []
            async with self._writing() as tx:
                for instance in batch:
                    reason = await self._apply_one(tx, instance.id, rule, rows)
                    if reason is None:
                        changed += 1
                    else:
                        skipped[reason] += 1
            await publish(rows)  # committed: the workers' sweepers cover a failure here
            done += len(batch)
            if progress is not None:
                progress(done, max(total, done))
        return BulkOutcome(
            action=action, dry_run=False, matched=done, changed=changed, skipped=dict(skipped), sample=[]
        )

    async def _apply_one(
        self, tx: Transaction, instance_id: str, rule: Rule, rows: list[OutboxRow]
    ) -> str | None:
        """Lock, re-check the selection's status, run the rule; None if it changed, else why not.

        The rule raises before it writes anything, so a refused instance leaves the batch's transaction clean.
        """
        lock = await tx.lock_instance(instance_id)
        if lock is None:
            return "deleted meanwhile"
        wanted = self._selection.status or (InstanceStatus.PAUSED if self._selection.held else None)
        if wanted is not None and lock.status != wanted:
            return f"no longer {wanted.value} (now {lock.status.value})"
        try:
            rows += await rule(tx, instance_id)
        except InvalidStateError as exc:
            return f"it is {exc.status}"
        except InstanceNotFoundError:
            return "deleted meanwhile"
        return None

    async def _count(self) -> int:
        async with self._reading() as tx:
            return await tx.count_selected_instances(self._selection)

    async def _batches(self) -> AsyncIterator[list[SelectedInstance]]:
        after: str | None = None
        while True:
            async with self._reading() as tx:
                page = await tx.selected_instances(self._selection, after_id=after, limit=self._batch_size)
            if not page:
                return
            after = page[-1].id
            yield page
            if len(page) < self._batch_size:
                return
