"""The Client's store and broker, opened and closed, and the connection that words driver errors."""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Self

from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from stepline.shared.broker import Broker, create_broker
from stepline.shared.codec import PayloadCodec, Payloads
from stepline.shared.db.records import OutboxRow
from stepline.shared.db.store import Store
from stepline.shared.db.stores import create_store_for
from stepline.shared.db.transaction import Transaction
from stepline.shared.errors import (
    ConfigError,
    StorageError,
)
from stepline.shared.outbox import OutboxRelay
from stepline.shared.redaction import mask_url, scrub_password
from stepline.shared.settings import (
    CLIENT_CONNECTIONS,
    CLIENT_HELD_CONNECTIONS,
    CLIENT_PROCESS,
    BrokerSettings,
    DatabaseSettings,
    OutboxSettings,
    PayloadSettings,
)

if TYPE_CHECKING:
    from stepline.producer.producer import Producer


class ClientBase:
    """The store and broker a Client opens and closes, and the connection its parts go through."""

    def __init__(
        self,
        database_url: str,
        amqp_url: str | None = None,
        *,
        namespace: str = "stepline",
        max_payload_bytes: int = 1024 * 1024,
        broker: BrokerSettings | None = None,
        database: DatabaseSettings | None = None,
        codec: PayloadCodec | None = None,
        store: Store | None = None,
        payload: PayloadSettings | None = None,
    ) -> None:
        self._broker_settings = broker
        # Params and events leave sealed; what is read back is opened with this codec's keys, and
        # shown as ``ENCRYPTED`` where this process has none that fits. Past ``offload_above``
        # they are stored apart first and the message carries the reference.
        payload = payload or PayloadSettings()
        self._payloads = Payloads(codec, offload_above=payload.offload_above, max_bytes=payload.max_bytes)
        self._producer: Producer | None = None
        self._database_settings = database or DatabaseSettings()
        self._database_url = database_url
        self._amqp_url = amqp_url
        self._namespace = namespace
        self._limit = max_payload_bytes
        self._given_store = store
        self._store: Store | None = None
        self._broker: Broker | None = None
        self._relay: OutboxRelay | None = None

    async def __aenter__(self) -> Self:
        # Pre-ping on checkout: after a failover, the next call finds the new primary by itself.
        # One connection held out of the pool for single statements (``get``): no pre-ping each time.
        self._store = self._given_store or create_store_for(
            self._database_url,
            self._database_settings,
            CLIENT_PROCESS,
            connections=CLIENT_CONNECTIONS,
            held=CLIENT_HELD_CONNECTIONS,
        )
        if self._amqp_url is not None:
            self._broker = create_broker(self._amqp_url, self._namespace, self._broker_settings)
            await self._broker.connect()
            self._relay = OutboxRelay(self._store, self._broker, OutboxSettings())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._broker is not None:
            await self._broker.close()
        if self._store is not None and self._store is not self._given_store:
            await self._store.close()
        self._store = self._broker = self._relay = self._producer = None

    async def _control(
        self,
        action: Callable[[Transaction], Awaitable[builtins.list[OutboxRow]]],
        *,
        publishes: bool = False,
    ) -> None:
        relay = self._relay
        if publishes and relay is None:
            self._broker_needed("this action")
        async with self._connection(begin=True) as tx:
            rows = await action(tx)
        if relay is not None:
            await relay.publish_committed(rows)  # workers' sweepers cover a failure here

    def _broker_needed(self, what: str) -> Broker:
        if self._broker is None:
            raise ConfigError(f"{what} publishes to RabbitMQ: create the Client with amqp_url")
        return self._broker

    @asynccontextmanager
    async def _connection(self, *, begin: bool = False, single: bool = False) -> AsyncIterator[Transaction]:
        """The store's statements (in a transaction if ``begin``; on a held autocommit connection if
        ``single``); driver errors become one clear StorageError, password hidden."""
        if self._store is None:
            raise RuntimeError("use the Client as 'async with Client(...) as client'")
        opened: contextlib.AbstractAsyncContextManager[Transaction]
        if begin:
            opened = self._store.transaction()
        else:
            opened = self._store.statements() if single else self._store.reading()
        try:
            async with opened as tx:
                yield tx
        except SQLAlchemyError as exc:
            lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            cause = lines[0] if lines else type(exc).__name__
            if _is_missing_schema(getattr(exc, "orig", None)):
                cause += " (the schema is older than this code: run `stepline db upgrade`)"
            cause = scrub_password(cause, self._database_url)
            raise StorageError(f"database error on {mask_url(self._database_url)}: {cause}") from exc
        except OSError as exc:
            raise StorageError(
                f"database unreachable at {mask_url(self._database_url)}: "
                f"{scrub_password(str(exc), self._database_url)}"
            ) from exc


def _is_lost_connection(error: BaseException | None) -> bool:
    """Whether a driver error says the connection was lost (SQLAlchemy invalidated it)."""
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _is_missing_schema(error: BaseException | None) -> bool:
    """A PostgreSQL "no such table/column" error: the schema is older than the code.

    psycopg is imported only when a database error is explained, so an embedded
    (SQLite) ``stepline status`` never loads it.
    """
    from psycopg.errors import UndefinedColumn, UndefinedTable

    return isinstance(error, UndefinedTable | UndefinedColumn)
