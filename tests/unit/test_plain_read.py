"""``plain_read`` runs ``Client.get``'s two statements as SQLAlchemy compiles them, word for word.

The plain read of ``stepline status`` keeps no query of its own: its texts are
``read_statements.instance_row_query`` and ``step_rows_query`` compiled for psycopg, and
its parameters those SQLAlchemy binds. After a change to either query, paste the text
the failure shows into ``plain_read``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg

from stepline.shared.db import plain_read
from stepline.shared.db.read_statements import instance_row_query, step_rows_query

DIALECT: sa.Dialect = psycopg.dialect()  # type: ignore[no-untyped-call]  # the engine's (postgresql+psycopg)


@pytest.mark.parametrize(
    ("query", "text", "params"),
    [
        (instance_row_query, plain_read.INSTANCE_ROW, plain_read.instance_row_params),
        (step_rows_query, plain_read.STEP_ROWS, plain_read.step_rows_params),
    ],
)
def test_the_plain_statements_are_the_stores_compiled(
    query: Callable[[str], sa.Select[Any]], text: str, params: Callable[[str], dict[str, Any]]
) -> None:
    compiled = query("order-7").compile(dialect=DIALECT)
    assert text == compiled.string, f"plain_read's text is out of date; now:\n{compiled.string!r}"
    assert params("order-7") == compiled.params


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@h1:5441,h2:5442/db?target_session_attrs=read-write",
        "postgres://u@localhost/db?sslmode=require",
    ],
)
def test_a_plain_postgresql_url_goes_to_libpq_as_it_is(url: str) -> None:
    assert plain_read.conninfo(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////tmp/state/stepline.db",
        "postgresql+psycopg://u@h/db",
        "postgresql://u@/db?host=h1:5441&host=h2:5442",
        "postgresql://u@h/db?pgbouncer=true",
        "postgresql://u@h/db?application_name=my+app",  # SQLAlchemy reads "my app", libpq "my+app"
    ],
)
def test_a_url_the_store_rewrites_first_is_read_through_the_store(url: str) -> None:
    with pytest.raises(plain_read.NotPlain):
        plain_read.conninfo(url)


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_is_left_to_the_client_after_the_plain_reads_own_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libpq alone would wait 130 s here, and the client the same again after it.
    monkeypatch.setattr(plain_read, "CONNECT_TIMEOUT_S", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks
        port = silent.getsockname()[1]
        with pytest.raises(plain_read.NotPlain):
            plain_read.read_instance_rows(f"postgresql://u@127.0.0.1:{port}/db", "stepline-status", "order-7")
