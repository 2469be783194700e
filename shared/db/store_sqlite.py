"""The SQLite store (the embedded mode): the plain statements, one transaction per use.

SQLite has no data-modifying WITH parts, so the composite writes run as the
statements ``stepline.shared.db.store.Transaction`` makes them of, in the caller's
transaction. Its engine has one connection, every transaction ``BEGIN
IMMEDIATE`` (``stepline.shared.db.engine``): that connection is the writer lock, so
even a single statement runs in a transaction of its own.
"""

from __future__ import annotations

from typing import ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import OperationalError, ProgrammingError

from stepline.shared.db.store import Store
from stepline.shared.db.transaction import Transaction


class SqliteTransaction(Transaction):
    """The statements of the SQLite connection: the base ones, with SQLite's INSERT."""

    __slots__ = ()

    def _insert(self, table: sa.Table) -> sqlite.Insert:
        return sqlite.insert(table)


class SqliteStore(Store):
    """SQLite: one connection, each use of it a transaction (see the module docstring)."""

    service: ClassVar[str] = "SQLite"
    _transaction_class: ClassVar[type[Transaction]] = SqliteTransaction
    # SQLite says "no such table" as an OperationalError.
    _missing_table_errors: ClassVar[tuple[type[Exception], ...]] = (ProgrammingError, OperationalError)
