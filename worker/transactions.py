"""``ctx.transaction`` steps: the step's code bound to the connection of the transaction that commits it."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from sqlalchemy.engine import RootTransaction
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import TransactionEndedError
from stepline.shared.history import format_key
from stepline.shared.messages import StepMessage
from stepline.worker.committed import Committed
from stepline.worker.context import StepCall
from stepline.worker.executor import StepAttemptFailed, StepResult, StepSucceeded
from stepline.worker.fencing import log_fields
from stepline.worker.step_info import step_info

log = logging.getLogger("stepline.worker")


async def transact_and_commit(
    store: Store,
    message: StepMessage,
    instance_id: str,
    call: StepCall,
    attempt: Callable[[StepCall], Awaitable[StepResult]],
    commit_locked: Callable[[StepResult, Transaction | None], Awaitable[Committed]],
) -> Committed:
    """Run a ``ctx.transaction`` step on the commit's own connection; commit its writes with its result.

    The step's code runs first (``attempt``), holding no lock on the instance; then, in the
    same transaction, the attempt is fenced and committed under the lock as a
    failure would be (``commit_locked``, which raises ``RolledBack`` when given the
    transaction and refusing the attempt). A failed attempt, or a fence that
    refuses it (another attempt committed meanwhile, the instance finished),
    rolls the code's writes back with everything else; a failure is then
    recorded on its own, the usual way (``commit_locked`` without a transaction).
    """
    try:
        async with store.transaction() as tx:
            result = await attempt(on_connection(call, tx.connection))
            if not isinstance(result, StepSucceeded):
                raise RolledBack(result)
            if result.offloaded is not None:
                await tx.insert_payload(instance_id, result.offloaded)
            committed = await commit_locked(result, tx)
    except RolledBack as rolled_back:
        if rolled_back.failure is None:
            text = "transactional step refused at commit; its writes were rolled back"
            log.info(text, extra=log_fields(message, "transaction_refused"))
            return Committed([])
        return await commit_locked(rolled_back.failure, None)
    return committed


class RolledBack(Exception):  # control flow between StepRunner and this module, never seen outside
    """Leaves a transactional step's transaction so that it rolls back: its attempt failed, or was refused."""

    def __init__(self, failure: StepAttemptFailed | None) -> None:
        super().__init__()
        self.failure = failure
        """The failed attempt to record; None if the fence refused the attempt (nothing to record)."""


def on_connection(call: StepCall, conn: AsyncConnection) -> StepCall:
    """``call`` as it runs in the commit's transaction: ``fn(conn, *args)``, kept from ending it.

    The connection comes first among the arguments (a testing kit's stub gets it
    too). The guard compares the connection's transaction before and after the
    code: one that committed, rolled back, or began another is refused with
    ``TransactionEndedError`` instead of having the step's result committed in
    a transaction its writes are not part of.
    """
    fn = call.fn

    async def guarded(conn: AsyncConnection, /, *args: Any, **kwargs: Any) -> Any:
        began = _transaction_of(conn)
        value = await fn(conn, *args, **kwargs)
        now = _transaction_of(conn)
        if began is None or now is not began or not now.is_active:
            info = step_info()
            step = format_key((info.name, info.occurrence))
            raise TransactionEndedError(info.instance_id, step, info.attempt)
        return value

    return replace(call, fn=guarded, args=(conn, *call.args))


def _transaction_of(conn: AsyncConnection) -> RootTransaction | None:
    """The connection's transaction now (a savepoint inside it does not change it)."""
    sync = conn.sync_connection
    return None if sync is None else sync.get_transaction()
