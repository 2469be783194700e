"""The storage seam: every statement Stepline runs, written once, on one connection.

``Transaction`` holds the statements, bound to a connection: a transaction's
(``Store.transaction``), or one lent for statements that each stand alone
(``Store.statements``). Its composite writes (``write_transition``,
``commit_settled_step``, ``start_instance``, ``record_attempt``,
``fire_due_timers``) are written here as the plain statements they are made
of, run one after another in the caller's transaction: that is what SQLite
runs, and what PostgreSQL's single statements (``stepline.shared.db.store_postgres``)
must write. Only what differs between the two databases is overridden in
``store_postgres`` and ``store_sqlite``; ``stepline.shared.db.stores.create_store``
picks one by URL. No SQL lives outside ``stepline.shared.db``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import ClassVar

import sqlalchemy as sa
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from stepline.shared.codec import JSON
from stepline.shared.db.batch_starts import NewInstance, StartedBatch
from stepline.shared.db.records import (
    FiredTimer,
    Message,
    NewStep,
    OutboxRow,
    SucceededAttempt,
)
from stepline.shared.db.revisions import head_revision
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import StorageError
from stepline.shared.history import History, ParentLink, StepKey
from stepline.shared.states import InstanceStatus


class Store:
    """One database: its engine, its transactions, and its one-statement operations.

    ``transaction()`` gives a ``Transaction`` in a transaction of its own (several
    statements, typically under ``lock_instance``). The methods on the store
    itself are operations of one statement (or, on SQLite, of a short
    transaction), run on a connection from ``statements()``.
    """

    service: ClassVar[str]
    """The database's name in messages to users."""
    writes_start_batches: ClassVar[bool] = False
    """Whether ``start_instances`` writes batches (PostgreSQL) or returns None (one at a time)."""
    _transaction_class: ClassVar[type[Transaction]] = Transaction
    # Errors that mean "no alembic_version table" (a database never migrated), not an outage.
    _missing_table_errors: ClassVar[tuple[type[Exception], ...]] = (ProgrammingError,)

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def engine(self) -> AsyncEngine:
        """The store's engine (for tests and benchmarks that read rows as a user would)."""
        return self._engine

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Statements in one transaction, committed when the block ends (rolled back if it raises)."""
        async with self._engine.begin() as conn:
            yield self._transaction_class(conn)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Transaction]:
        """Statements that only read, on one connection (rolled back at the end)."""
        async with self._engine.connect() as conn:
            yield self._transaction_class(conn)

    def statements(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """A connection for statements that each stand alone: on PostgreSQL autocommit, held open."""
        return self.transaction()

    async def close(self) -> None:
        """Give back every connection; the store is not used afterwards."""
        await self._engine.dispose()

    # ---------------------------------------------------------------- one statement each

    async def load_history(self, instance_id: str) -> History | None:
        """An instance and all its steps; None if there is no such instance."""
        async with self.statements() as tx:
            return await tx.load_history(instance_id)

    async def unfinished_histories(
        self, workflows: Sequence[str], *, page_size: int = 500, limit: int | None = None
    ) -> AsyncIterator[list[History]]:
        """The histories of unfinished instances of ``workflows``, a page at a time, in id order.

        Each page is read on a connection of its own and given back before the
        caller sees it: a long check holds no connection (nor snapshot) open
        while it replays. ``limit`` caps the number of instances in all.
        """
        after: str | None = None
        left = limit
        while left is None or left > 0:
            size = page_size if left is None else min(page_size, left)
            async with self.reading() as tx:
                page = await tx.unfinished_histories(after=after, limit=size, workflows=workflows)
            if not page:
                return
            yield page
            after = page[-1].instance_id
            if left is not None:
                left -= len(page)
            if len(page) < size:
                return

    async def unfinished_workflows(self) -> dict[str, int]:
        """How many unfinished instances each workflow has."""
        async with self.reading() as tx:
            return await tx.unfinished_workflows()

    async def commit_settled_step(
        self,
        instance_id: str,
        key: StepKey,
        *,
        version: int,
        attempt: SucceededAttempt | None,
        result: JSON,
        new_steps: Sequence[NewStep],
        status: InstanceStatus,
        output: JSON = None,
        error: JSON = None,
        messages: Sequence[Message] = (),
    ) -> list[OutboxRow] | None:
        """``Transaction.commit_settled_step`` on its own (on PostgreSQL one statement, no transaction)."""
        async with self.statements() as tx:
            return await tx.commit_settled_step(
                instance_id,
                key,
                version=version,
                attempt=attempt,
                result=result,
                new_steps=new_steps,
                status=status,
                output=output,
                error=error,
                messages=messages,
            )

    async def start_instance(
        self,
        *,
        instance_id: str,
        workflow: str,
        params: JSON,
        trace_context: dict[str, str] | None,
        parent: ParentLink | None,
        new_steps: Sequence[NewStep],
        status: InstanceStatus,
        output: JSON = None,
        error: JSON = None,
        messages: Sequence[Message] = (),
        build_id: str | None = None,
        priority: int = 0,
    ) -> list[OutboxRow] | None:
        """``Transaction.start_instance`` on its own (on PostgreSQL one statement, no transaction)."""
        async with self.statements() as tx:
            return await tx.start_instance(
                instance_id=instance_id,
                workflow=workflow,
                params=params,
                trace_context=trace_context,
                parent=parent,
                new_steps=new_steps,
                status=status,
                output=output,
                error=error,
                messages=messages,
                build_id=build_id,
                priority=priority,
            )

    async def start_instances(self, batch: Sequence[NewInstance]) -> StartedBatch | None:
        """Start many new instances at once, atomically; None where the database takes them one at a time.

        PostgreSQL writes the whole batch in one statement (``stepline.shared.db.batch_starts``);
        SQLite, whose one connection is the writer lock, gains nothing from it (``writes_start_batches``).
        """
        return None

    async def fire_due_timers(self, *, limit: int) -> list[FiredTimer]:
        """Claim, delete and queue up to ``limit`` due timers (on PostgreSQL one statement)."""
        async with self.statements() as tx:
            return await tx.fire_due_timers(limit=limit)

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        """Forget rows whose messages the broker confirmed (one statement)."""
        async with self.statements() as tx:
            await tx.delete_outbox(ids)

    async def seconds_until_next_timer(self) -> float | None:
        """Seconds until the earliest armed timer is due (negative if overdue); None if none."""
        async with self.reading() as tx:
            return await tx.seconds_until_next_timer()

    async def seconds_until_next_due(self) -> tuple[float | None, float | None]:
        """Seconds until the next timer is due, and until the next limit lease lapses or token is due.

        One statement (three indexed minimums); each None when nothing is armed.
        """
        async with self.reading() as tx:
            return await tx.seconds_until_next_due()

    async def next_timer_due(
        self, *, instance_id: str | None = None, kinds: Sequence[str] | None = None
    ) -> datetime | None:
        """When the earliest armed timer (of one instance, of these kinds) is due; None if none is."""
        async with self.reading() as tx:
            return await tx.next_timer_due(instance_id=instance_id, kinds=kinds)

    async def answers(self) -> bool:
        """Whether the database answers a trivial query now."""
        async with self._engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
        return True

    async def check_schema(self) -> None:
        """Make sure the database is migrated to the revision this code needs.

        Raises:
            StorageError: it is not, with the command that fixes it.
            SQLAlchemyError, OSError: the database cannot be reached (callers retry).
        """
        needed = head_revision()  # read from the migration files: no Alembic imported
        async with self._engine.connect() as conn:
            try:
                found = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar()
            except self._missing_table_errors:
                found = None
        if found != needed:
            raise StorageError(
                f"the database schema is at revision {found or 'none'}, this code needs {needed}: "
                "run `stepline db upgrade`"
            )
