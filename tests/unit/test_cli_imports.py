"""What ``stepline`` imports to answer: a command's module is loaded only to run that command.

Operators type ``stepline --help`` and ``stepline status ID`` all day, and nearly all of
their time was Python importing modules they did not use (issue 21: 1.7 to 2.9 s for
``--help``). These tests hold the import graph, not a timing (``python -m benchmarks
--only cli`` measures the time): ``--help`` loads no engine code and no heavy library, and
``status`` loads the database's code but not aio-pika, OpenTelemetry's SDK and exporters,
Alembic or the worker. ``tests/e2e/test_cli_imports.py`` checks ``status`` of a real
instance on both stores. ``docs/development.md`` says how to add a command.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from stepline.shared.db import stores
from stepline.shared.settings import Settings
from tests.support.cli import among, imported_by

NOT_FOR_HELP = (
    "sqlalchemy",
    "alembic",
    "psycopg",
    "aiosqlite",
    "aio_pika",
    "aiormq",
    "opentelemetry",
    "pydantic",
    "pydantic_settings",
    "rich",
    "stepline.producer",
    "stepline.worker",
    "stepline.scheduler",
    "stepline.shared.db",
    "stepline.shared.broker",
)
"""``stepline --help`` prints a list: it needs click and the command table, nothing else."""

NOT_FOR_STATUS = (
    "aio_pika",
    "aiormq",
    "pamqp",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "grpc",
    "alembic",
    "stepline.worker",
    "stepline.scheduler",
)
"""``stepline status ID`` reads the database: no broker, no telemetry export, no migrations, no worker."""

NOT_FOR_EMBEDDED_STATUS = (*NOT_FOR_STATUS, "psycopg")
"""On the embedded store (SQLite) the PostgreSQL driver is not needed either."""

NOT_FOR_POSTGRES_STATUS = (
    *NOT_FOR_STATUS,
    "sqlalchemy",
    "aiosqlite",
    "stepline.producer.client",
    "stepline.shared.broker",
)
"""On PostgreSQL it reads with psycopg alone (issue 23: SQLAlchemy was half its time), without the client."""

STATUS_ON_POSTGRES = (
    "stepline.producer.cli",
    "stepline.producer.pool_status",
    "stepline.producer.instance_rows",
    "stepline.shared.db.plain_read",
)
"""What ``stepline status`` loads on PostgreSQL before it connects (heavier reads are imported lazily)."""


def _env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STEPLINE_", "OTEL_"))}
    return {**env, **extra}


def test_help_lists_every_command_and_imports_no_engine_code() -> None:
    modules, result = imported_by(_env(), "--help")

    assert result.returncode == 0, result
    needless = among(modules, NOT_FOR_HELP)
    assert needless == [], f"stepline --help imported {needless}"
    from stepline.cli import COMMANDS

    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)


def test_status_on_the_embedded_store_reads_the_database_without_broker_telemetry_or_worker(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    stores.upgrade(Settings(embedded=state).database)

    modules, result = imported_by(_env(STEPLINE_EMBEDDED=str(state)), "status", "no-such-instance")

    # The read ran to its end: the store was opened and asked, and found nothing.
    assert result.returncode == 1, result
    assert "no instance has id 'no-such-instance' yet" in result.stderr
    assert among(modules, ["sqlalchemy", "aiosqlite"]) != [], "status did not open the store"
    needless = among(modules, NOT_FOR_EMBEDDED_STATUS)
    assert needless == [], f"stepline status imported {needless}"


def test_status_on_postgresql_imports_no_sqlalchemy_nor_the_client() -> None:
    # Its read needs a database (tests/e2e/test_cli_imports.py runs it): here, what it loads to make it.
    probe = (
        "import importlib, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\nprint(*sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *STATUS_ON_POSTGRES],
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    needless = among(set(done.stdout.split()), NOT_FOR_POSTGRES_STATUS)
    assert needless == [], f"stepline status on PostgreSQL imports {needless}"


def test_the_command_table_names_each_command_and_its_first_sentence() -> None:
    from stepline.cli import COMMANDS, load_command

    for name, entry in COMMANDS.items():
        command = load_command(entry)
        assert isinstance(command, click.Command), name
        assert command.name == name, f"COMMANDS[{name!r}] loads the command named {command.name!r}"
        # `stepline --help` shows the table's sentence: it must be the command's own.
        assert entry.help == command.get_short_help_str(limit=1000), f"COMMANDS[{name!r}].help"


def test_an_entry_that_names_no_command_fails_clearly() -> None:
    from stepline.cli import Lazy, load_command

    with pytest.raises(TypeError, match=r"stepline\.cli:COMMANDS is a dict, not a click command"):
        load_command(Lazy("stepline.cli:COMMANDS", "Not a command."))


@pytest.mark.parametrize("package", ["stepline", "stepline.producer", "stepline.shared.broker"])
def test_a_lazy_package_declares_for_mypy_the_names_it_resolves_at_run_time(package: str) -> None:
    # mypy and editors read the TYPE_CHECKING imports; Python reads _LAZY: they must agree.
    module = importlib.import_module(package)
    assert module.__file__ is not None
    declared: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(Path(module.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for item in node.body:
                assert isinstance(item, ast.ImportFrom) and item.module, ast.dump(item)
                declared.setdefault(item.module, set()).update(alias.name for alias in item.names)
    lazy = {name: set(names) for name, names in module._LAZY.items()}
    assert declared == lazy
    assert set(module.__all__) <= {name for names in lazy.values() for name in names}


def test_a_probe_that_writes_no_report_fails_instead_of_passing(tmp_path: Path) -> None:
    # A process that dies before its exit hooks (a crash, a kill) wrote no report: it did not
    # import "nothing". sitecustomize runs first and ends the interpreter at once.
    (tmp_path / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    with pytest.raises(AssertionError, match="wrote no import report"):
        imported_by(_env(PYTHONPATH=str(tmp_path)), "--help")
