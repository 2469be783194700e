"""``ctx.transaction`` steps: the step's code bound to the connection of the transaction that commits it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy.engine import RootTransaction
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.errors import TransactionEndedError
from stepline.shared.history import format_key
from stepline.worker.context import StepCall
from stepline.worker.step_info import step_info


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
