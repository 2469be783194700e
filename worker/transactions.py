"""``ctx.transaction`` steps: the step's code bound to the connection of the transaction that commits it."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy.engine import RootTransaction
from sqlalchemy.ext.asyncio import AsyncConnection

from stepline.shared.errors import NonRetryableError
from stepline.shared.history import format_key
from stepline.worker.context import StepCall
from stepline.worker.step_info import step_info


class TransactionEndedError(NonRetryableError):
    """A transactional step's code committed or rolled back the engine's transaction itself.

    Its writes and the step's result must commit together, so the engine alone
    ends that transaction. The attempt fails for good: a retry could not know
    which of its writes (those before a commit of its own) are already in.
    """

    def __init__(self, instance_id: str, step: str, attempt: int) -> None:
        super().__init__(
            f"transactional step {step!r} of instance {instance_id!r} (attempt {attempt}) committed or "
            "rolled back the connection it was given: the engine commits it with the step's result, "
            "so the step's code must neither commit nor roll back (nor begin a new transaction); "
            "use conn.begin_nested() for a savepoint. What it committed itself is not undone."
        )
        self.instance_id = instance_id
        self.step = step
        self.attempt = attempt


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
