"""The worker's hot statements, compiled whole, against the files under ``tests/golden/``.

The statements that commit a step, start an instance and fire timers are built
from the shape of what they write (how many new entries of which kind, how many
messages, whether the instance ends), so none appears whole in the source.
Each ``tests/golden/<operation>.<shape>.sql`` is one of them as PostgreSQL
receives it (psycopg's ``%(name)s`` parameters), laid out on lines: a reviewer
reads the SQL there, and a change to a statement shows in the diff of its file.

After a deliberate change, regenerate the files and review their diff::

    STEPLINE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_golden_sql.py

The layout only replaces spaces with line breaks: each file is checked to be
the compiled statement word for word.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.sql.compiler import SQLCompiler

from stepline.shared.db.postgres_writes import fire_statement, settled_step_statement, shapes, start_statement
from stepline.shared.db.records import NewStep
from stepline.shared.states import StepKind, StepStatus

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
UPDATE = os.environ.get("STEPLINE_UPDATE_GOLDEN") == "1"
DIALECT: sa.Dialect = psycopg.dialect()  # type: ignore[no-untyped-call]  # the engine's (postgresql+psycopg)

STEP = NewStep(("next", 1), 3, StepKind.STEP, StepStatus.RUNNING)
OTHER_STEP = NewStep(("other", 1), 4, StepKind.STEP, StepStatus.RUNNING)
VALUE = NewStep(("now", 1), 3, StepKind.VALUE, StepStatus.SUCCEEDED, result="2026-01-01T00:00:00+00:00")
CHILD = NewStep(("child", 1), 3, StepKind.CHILD, StepStatus.RUNNING, detail={"child_id": "c"})
SLEEP = NewStep(("nap", 1), 3, StepKind.SLEEP, StepStatus.WAITING, delay=timedelta(seconds=30))


@dataclass(frozen=True)
class Shape:
    """One statement: its file's name, what it writes (in the file's header), how to build it."""

    name: str
    says: str
    build: Callable[[], sa.Select[Any]]


def _settled(
    new: Sequence[NewStep], messages: int, *, finishing: bool = False, records_attempt: bool = True
) -> Callable[[], sa.Select[Any]]:
    return lambda: settled_step_statement(shapes(new), messages, finishing, records_attempt=records_attempt)


def _start(new: Sequence[NewStep], messages: int, *, finishing: bool = False) -> Callable[[], sa.Select[Any]]:
    return lambda: start_statement(shapes(new), messages, finishing)


SHAPES = [
    Shape(
        "commit_settled_step.step_then_one_step",
        "a step succeeded; the workflow asks for one more step, sent as one message",
        _settled([STEP], 1),
    ),
    Shape(
        "commit_settled_step.step_then_two_parallel_steps",
        "a step succeeded; the workflow asks for two steps at once (asyncio.gather), two messages",
        _settled([STEP, OTHER_STEP], 2),
    ),
    Shape(
        "commit_settled_step.step_then_value_and_step",
        "a step succeeded; the workflow records ctx.now() (a settled entry), then asks for a step",
        _settled([VALUE, STEP], 1),
    ),
    Shape(
        "commit_settled_step.step_then_child",
        "a step succeeded; the workflow starts a child workflow (its start message goes out)",
        _settled([CHILD], 1),
    ),
    Shape(
        "commit_settled_step.step_finishes_instance",
        "a step succeeded and the workflow returned: the instance completes, its timers are disarmed",
        _settled([], 0, finishing=True),
    ),
    Shape(
        "commit_settled_step.child_step_finishes_instance",
        "as step_finishes_instance, for a child: the message wakes its parent",
        _settled([], 1, finishing=True),
    ),
    Shape(
        "commit_settled_step.sleep_ends_then_one_step",
        "a sleep's timer fired (no attempt to record); the workflow asks for one step",
        _settled([STEP], 1, records_attempt=False),
    ),
    Shape(
        "start_instance.one_step",
        "a new instance whose first step goes out as a message",
        _start([STEP], 1),
    ),
    Shape(
        "start_instance.finishes_at_once",
        "a new instance whose workflow returned before any step: it is complete on insert",
        _start([], 0, finishing=True),
    ),
    Shape(
        "fire_due_timers",
        "the scheduler: due timers deleted, each one's message queued in the outbox, in one statement",
        fire_statement,
    ),
]

# Only these shapes qualify: a sleep's entry is never part of the one-statement commit.
assert all(not shape[2] for shape in shapes([STEP, OTHER_STEP, VALUE, CHILD])) and shapes([SLEEP])[0][2]

# Clauses that start a line when they are at the top of the statement or of a WITH part.
_CLAUSES = (
    ("SELECT",), ("FROM",), ("WHERE",), ("SET",), ("RETURNING",), ("ON", "CONFLICT"),
    ("LEFT", "OUTER", "JOIN"), ("ORDER", "BY"), ("LIMIT",), ("UNION", "ALL"), ("AND",),
)  # fmt: skip
_PLACEHOLDER = re.compile(r"%\(\w+\)s")  # psycopg's parameters: their parentheses are no nesting
_WIDTH = 100


def compiled(statement: sa.Select[Any]) -> tuple[str, dict[str, object]]:
    """The SQL PostgreSQL receives, and the values of the statement's own literals by parameter name."""
    result = statement.compile(dialect=DIALECT)
    assert isinstance(result, SQLCompiler)
    literals = {
        name: bind.effective_value.value if isinstance(bind.effective_value, Enum) else bind.effective_value
        for bind, name in result.bind_names.items()
        if not bind.required
    }
    return result.string, dict(sorted(literals.items()))


def laid_out(sql: str) -> str:
    """``sql`` on lines: each WITH part apart, its clauses on lines of their own, long lists wrapped.

    Only spaces become line breaks (and indentation), so the words stay the compiled ones.
    A subquery (two parentheses deep) stays on its clause's line.
    """
    words = sql.split()
    lines: list[str] = []
    line: list[str] = []
    depth = 0

    def close(blank: bool = False) -> None:
        if line:
            lines.append(" ".join(line))
            line.clear()
        if blank:
            lines.append("")

    for index, word in enumerate(words):
        ahead = tuple(words[index : index + 3])
        names_part = depth == 0 and len(ahead) == 3 and ahead[1] == "AS" and ahead[2].startswith("(")
        clause = any(ahead[: len(keyword)] == keyword for keyword in _CLAUSES)
        if names_part and words[index - 1] != "WITH":
            close(blank=True)
        elif clause and depth <= 1 and words[index - 1].lstrip("(") != "DELETE":
            close(blank=depth == 0 and word == "SELECT")
        if not line:
            word = "    " * (depth + word.startswith("(")) + word
        line.append(word)
        bare = _PLACEHOLDER.sub("", word)
        depth += bare.count("(") - bare.count(")")
        if depth == 0 and word == "AS" and words[index + 1].startswith("("):
            close()  # the part's name on its line, its statement below
    close()
    return "\n".join(piece for text in lines for piece in _wrapped(text)) + "\n"


def _wrapped(line: str) -> list[str]:
    """A long line broken after commas, each piece at most about ``_WIDTH`` wide, indented once more."""
    if len(line) <= _WIDTH:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    pieces, current = [], ""
    for part in re.split(r"(?<=,) ", line):
        if current and len(current) + 1 + len(part) > _WIDTH:
            pieces.append(current)
            current = indent + part
        else:
            current = f"{current} {part}" if current else part
    return [*pieces, current]


def golden_text(shape: Shape) -> str:
    sql, literals = compiled(shape.build())
    header = [
        f"-- {shape.says}.",
        "-- Generated by tests/unit/test_golden_sql.py: STEPLINE_UPDATE_GOLDEN=1 rewrites it.",
    ]
    if literals:
        header.append(
            "-- The statement's own values: " + ", ".join(f"{k}={v!r}" for k, v in literals.items())
        )
    return "\n".join(header) + "\n\n" + laid_out(sql)


@pytest.mark.parametrize("shape", SHAPES, ids=[shape.name for shape in SHAPES])
def test_each_hot_statement_matches_its_golden_file(shape: Shape) -> None:
    path = GOLDEN / f"{shape.name}.sql"
    expected = golden_text(shape)
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(expected, encoding="utf-8")
    assert path.is_file(), f"{path} is missing: run with STEPLINE_UPDATE_GOLDEN=1 to write it"
    assert path.read_text(encoding="utf-8") == expected, (
        f"{shape.name} changed: review it, then rewrite {path.name} with STEPLINE_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize("shape", SHAPES, ids=[shape.name for shape in SHAPES])
def test_the_layout_keeps_the_compiled_statement_word_for_word(shape: Shape) -> None:
    sql, _ = compiled(shape.build())
    body = laid_out(sql)
    assert " ".join(body.split()) == " ".join(sql.split())
    assert all(len(line) <= _WIDTH + 40 for line in body.splitlines()), "the layout left a very long line"


def test_no_golden_file_is_left_without_its_shape() -> None:
    names = {shape.name for shape in SHAPES}
    assert sorted(path.stem for path in GOLDEN.glob("*.sql") if path.stem not in names) == []


def test_the_unfinished_histories_name_the_unfinished_statuses_with_in() -> None:
    # IN reads one small index range per status; "!= ALL(finished)" read every finished instance.
    from stepline.shared.db.postgres_reads import UNFINISHED_HISTORIES
    from stepline.shared.states import UNFINISHED_STATUSES

    compiled = UNFINISHED_HISTORIES.compile(dialect=DIALECT)
    assert isinstance(compiled, SQLCompiler)
    where = compiled.string.split("FROM instances", 1)[1]
    assert "instances.status IN (" in where and "ALL" not in where
    named = {bind.effective_value for bind in compiled.binds.values() if not bind.required}
    assert {status.value for status in UNFINISHED_STATUSES} <= named
