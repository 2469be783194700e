"""The dependency arrows and public names of the four packages, pinned.

``stepline.shared`` imports nothing of ours; ``stepline.producer``, ``stepline.worker`` and
``stepline.scheduler`` import only ``stepline.shared`` (and never ``stepline`` itself, whose
``__init__`` imports worker and producer). The old top-level names (``worker``, ``shared``,
...) are gone: nothing may import them. Each package's ``__all__`` is pinned so a change to
the public API is a deliberate edit here. No module may use pickle, ``eval`` or ``exec``.
Only the two stores and the factories that pick a store or a broker by URL may
test which database they run on (``_is_sqlite``, ``dialect.name``, ``== "sqlite"``).
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shared", "worker", "scheduler", "producer")  # folders, imported as stepline.<name>
# Where code lives that must use the new names only (the folders above and these).
OTHER_CODE = ("examples", "tests", "benchmarks")
ALLOWED: dict[str, frozenset[str]] = {
    "shared": frozenset({"shared"}),
    "worker": frozenset({"shared", "worker"}),
    "scheduler": frozenset({"shared", "scheduler"}),
    "producer": frozenset({"shared", "producer"}),
}
PICKLE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve"})
FORBIDDEN_CALLS = frozenset({"eval", "exec"})


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str

    @property
    def top(self) -> str:
        """The part of Stepline imported (``worker`` for ``stepline.worker.x``), ``stepline``
        for the package itself, else the top-level module (``worker`` too: the old name)."""
        parts = self.module.split(".")
        return parts[1] if parts[0] == "stepline" and len(parts) > 1 else parts[0]

    @property
    def is_ours(self) -> bool:
        return self.module.split(".")[0] == "stepline"

    def __str__(self) -> str:
        return f"{_shown(self.path)}:{self.line} imports {self.module}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] in PACKAGES:
        parts.insert(0, "stepline")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module_name: str | None = None) -> list[Import]:
    """Every import in a module, relative ones resolved, at any depth (TYPE_CHECKING too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    package_parts = (module_name or _module_name(path)).split(".")
    if path.name != "__init__.py":
        package_parts = package_parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(path, node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append(Import(path, node.lineno, module))
            # ``from shared import worker``-style: the names may be modules too.
            found.extend(Import(path, node.lineno, f"{module}.{alias.name}") for alias in node.names)
    return found


def test_every_package_has_modules() -> None:
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").is_file(), package
        assert (ROOT / package / "py.typed").is_file(), f"{package} ships no py.typed"
        assert len(_modules(package)) >= 2, package


def test_import_walker_sees_relative_and_nested_imports(tmp_path: Path) -> None:
    # The walker itself must be able to fail: feed it a module with each kind of import.
    module = tmp_path / "fake.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "import stepline.scheduler.timers\n"
        "from . import context\n"
        "from .. import plan\n"
        "if TYPE_CHECKING:\n"
        "    from stepline.producer import Client\n"
        "def f() -> None:\n"
        "    import stepline.shared.codec\n",
        encoding="utf-8",
    )
    found = {item.module for item in _imports(module, "stepline.worker.replay.fake")}
    assert {
        "stepline.scheduler.timers",
        "stepline.worker.replay.context",
        "stepline.worker.plan",
        "stepline.producer.Client",
    } <= found
    assert "stepline.shared.codec" in found
    tops = {item.top for item in _imports(module, "stepline.worker.replay.fake") if item.is_ours}
    assert tops - ALLOWED["worker"] == {"scheduler", "producer"}


def test_import_walker_resolves_relative_imports_in_packages() -> None:
    names = {item.module for item in _imports(ROOT / "worker" / "replay" / "__init__.py")}
    assert "stepline.worker.replay.engine" in names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_only_at_allowed_packages(package: str) -> None:
    wrong = [
        str(item)
        for path in _modules(package)
        for item in _imports(path)
        if item.is_ours and item.top not in ALLOWED[package]
    ]
    assert wrong == [], f"{package} may import only {sorted(ALLOWED[package])}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_pickle(package: str) -> None:
    wrong = [str(item) for path in _modules(package) for item in _imports(path) if item.top in PICKLE_MODULES]
    assert wrong == [], "payloads are JSON only:\n" + "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_eval_or_exec(package: str) -> None:
    wrong = []
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            if _called_builtin(node.func) in FORBIDDEN_CALLS:
                wrong.append(f"{_shown(path)}:{node.lineno} calls {_called_builtin(node.func)}()")
    assert wrong == [], "\n".join(wrong)


def _called_builtin(func: ast.expr) -> str:
    """``eval`` for ``eval(...)`` and ``builtins.eval(...)``; empty for other calls."""
    if isinstance(func, ast.Name):
        return func.id
    if (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id in ("builtins", "__builtins__")
    ):
        return func.attr
    return ""


def test_eval_finder_can_fail() -> None:
    calls = [
        _called_builtin(node.func)
        for node in ast.walk(ast.parse("eval('1')\nbuiltins.exec('x')\nconn.exec('y')\nprint(2)"))
        if isinstance(node, ast.Call)
    ]
    assert calls == ["eval", "exec", "", "print"]


EXPECTED_ALL = {
    "worker": [
        "Concurrency",
        "ConcurrencyKeyError",
        "ConcurrencyLimit",
        "Context",
        "EventTimeoutError",
        "HeartbeatTimeoutError",
        "InvalidRetryAfterError",
        "InvalidScheduleError",
        "NonDeterminismError",
        "NonRetryableError",
        "RateLimit",
        "RetryAfter",
        "RetryPolicy",
        "RunningStep",
        "Schedule",
        "StepFailedError",
        "StepTimeoutError",
        "SteplineError",
        "TransactionEndedError",
        "Workflow",
        "step_info",
        "workflow",
    ],
    "producer": [
        "AesGcmCodec",
        "AttemptInfo",
        "BrokerError",
        "BulkOutcome",
        "Client",
        "ConfigError",
        "DeadLetterInfo",
        "DeadLetterNotFoundError",
        "DeadLetterOutcome",
        "DeadLetters",
        "EventInfo",
        "InstanceInfo",
        "InstanceNotFoundError",
        "InvalidIdError",
        "InvalidParamsError",
        "InvalidScheduleError",
        "InvalidStateError",
        "PayloadCodec",
        "PayloadTooLargeError",
        "PayloadUnreadableError",
        "Producer",
        "Schedule",
        "ScheduleConflictError",
        "ScheduleInfo",
        "ScheduleNotFoundError",
        "Settings",
        "StepInfo",
        "SteplineError",
        "StorageError",
        "UnregisteredWorkflowError",
        "UnroutableError",
        "WaitTimeoutError",
        "WorkflowRef",
        "load_settings",
    ],
    "scheduler": ["fire_due_timers", "run_scheduler"],
    "stepline": [
        "AesGcmCodec",
        "AttemptInfo",
        "BrokerError",
        "Client",
        "Concurrency",
        "ConcurrencyKeyError",
        "ConcurrencyLimit",
        "ConfigError",
        "Context",
        "EventInfo",
        "EventTimeoutError",
        "HeartbeatTimeoutError",
        "InstanceInfo",
        "InstanceNotFoundError",
        "InvalidIdError",
        "InvalidParamsError",
        "InvalidRetryAfterError",
        "InvalidScheduleError",
        "InvalidStateError",
        "NonDeterminismError",
        "NonRetryableError",
        "PayloadCodec",
        "PayloadTooLargeError",
        "PayloadUnreadableError",
        "Producer",
        "RateLimit",
        "RetryAfter",
        "RetryPolicy",
        "RunningStep",
        "Schedule",
        "ScheduleConflictError",
        "ScheduleInfo",
        "ScheduleNotFoundError",
        "Settings",
        "StepFailedError",
        "StepInfo",
        "StepTimeoutError",
        "SteplineError",
        "StorageError",
        "TransactionEndedError",
        "UnregisteredWorkflowError",
        "UnroutableError",
        "WaitTimeoutError",
        "load_settings",
        "step_info",
        "workflow",
    ],
}


@pytest.mark.parametrize("package", sorted(EXPECTED_ALL))
def test_public_names_are_pinned(package: str) -> None:
    module = importlib.import_module(package if package == "stepline" else f"stepline.{package}")
    exported: list[str] = list(module.__all__)
    assert sorted(exported) == EXPECTED_ALL[package]
    assert len(set(exported)) == len(exported), f"{package}.__all__ lists a name twice"
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names {name}, which it does not define"


def test_design_names_are_importable() -> None:
    from stepline import Context, NonRetryableError, RetryPolicy, workflow

    assert callable(workflow)
    assert isinstance(Context, type)
    assert isinstance(RetryPolicy, type)
    assert issubclass(NonRetryableError, Exception)


# Where a dialect test belongs: the stores themselves, and the factories that choose by URL.
DIALECT_CHECKS_ALLOWED = frozenset(
    {
        "shared/db/store_postgres.py",
        "shared/db/store_sqlite.py",
        "shared/db/engine.py",  # create_engine: the driver and pool a URL needs
        "shared/db/stores.py",  # create_store and upgrade: the store a URL needs
        "shared/broker/factory.py",  # create_broker: RabbitMQ, or the embedded queue
    }
)
_DIALECT_FUNCTIONS = frozenset({"is_sqlite", "_is_sqlite"})


def _dialect_checks(path: Path) -> list[str]:
    """Every test of which database the code runs on, in code (comments and docstrings aside).

    A call of ``is_sqlite``/``_is_sqlite``, a read of ``<...>dialect.name``, and a
    comparison with the string ``"sqlite"``.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        what = ""
        if isinstance(node, ast.Call) and _called_name(node.func) in _DIALECT_FUNCTIONS:
            what = f"calls {_called_name(node.func)}()"
        elif (
            isinstance(node, ast.Attribute) and node.attr == "name" and _called_name(node.value) == "dialect"
        ):
            what = "reads dialect.name"
        elif isinstance(node, ast.Compare) and any(
            isinstance(part, ast.Constant) and part.value == "sqlite"
            for part in [node.left, *node.comparators]
        ):
            what = 'compares with "sqlite"'
        if what:
            line = getattr(node, "lineno", 0)  # every node matched above is an expression: it has one
            found.append(f"{_shown(path)}:{line} {what}")
    return found


def _called_name(func: ast.expr) -> str:
    """``f`` for ``f``, ``x.f`` and ``x.y.f``; empty for anything else."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


@pytest.mark.parametrize("package", PACKAGES)
def test_dialect_checks_live_only_in_the_stores_and_factories(package: str) -> None:
    wrong = [
        check
        for path in _modules(package)
        if _shown(path) not in DIALECT_CHECKS_ALLOWED
        for check in _dialect_checks(path)
    ]
    assert wrong == [], (
        "which database runs is the stores' business (shared/db/store_postgres.py, "
        "shared/db/store_sqlite.py): add a Store method instead of a branch:\n" + "\n".join(wrong)
    )


def test_dialect_check_finder_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "planted.py"
    module.write_text(
        '"""A docstring may say dialect.name == "sqlite"."""\n'
        "# so may a comment: _is_sqlite(conn)\n"
        "def f(conn, url, engine):\n"
        "    a = _is_sqlite(conn)\n"
        "    b = is_sqlite(url)\n"
        "    c = engine.sync_engine.dialect.name\n"
        '    d = conn.dialect.name == "sqlite"\n'
        '    e = "sqlite" != url\n'
        "    return a, b, c, d, e\n",
        encoding="utf-8",
    )
    lines = sorted(
        (int(check.split(":")[1].split()[0]), check.split(" ", 1)[1]) for check in _dialect_checks(module)
    )
    assert lines == [
        (4, "calls _is_sqlite()"),
        (5, "calls is_sqlite()"),
        (6, "reads dialect.name"),
        (7, 'compares with "sqlite"'),
        (7, "reads dialect.name"),
        (8, 'compares with "sqlite"'),
    ]


OLD_NAMES = frozenset(PACKAGES)


def _old_name_imports(path: Path, module_name: str | None = None) -> list[str]:
    """The imports in a module that name a package by its old top-level name (``from worker import``)."""
    return [str(item) for item in _imports(path, module_name) if item.module.split(".")[0] in OLD_NAMES]


@pytest.mark.parametrize("folder", PACKAGES + OTHER_CODE)
def test_nothing_imports_the_old_top_level_names(folder: str) -> None:
    # A checkout has its root on sys.path, so ``import worker`` would still work here and load
    # a second copy of every module; an installed Stepline has no ``worker`` at all.
    wrong = [found for path in _modules(folder) for found in _old_name_imports(path)]
    assert wrong == [], "import stepline.<package>, never the folder's name:\n" + "\n".join(wrong)


def test_old_name_finder_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "old.py"
    module.write_text(
        "import worker\n"
        "from shared.errors import SteplineError\n"  # the old name, on purpose
        "from stepline.worker import workflow\n"
        "from stepline import Client\n"
        "import sharedlib\n",
        encoding="utf-8",
    )
    found = _old_name_imports(module, "tests.old")
    modules = [line.split(" imports ")[1] for line in found]
    old = "shared.errors"  # the old name, on purpose
    assert modules == ["worker", old, f"{old}.SteplineError"]


def test_stepline_resolves_to_the_folders() -> None:
    import stepline.shared
    import stepline.worker

    assert Path(stepline.worker.__file__).resolve() == ROOT / "worker" / "__init__.py"
    assert Path(stepline.shared.__file__).resolve() == ROOT / "shared" / "__init__.py"
    assert (ROOT / "stepline" / "py.typed").is_file()


def test_stepline_reexports_the_packages_own_objects() -> None:
    import stepline
    import stepline.producer
    import stepline.worker

    for name in stepline.__all__:
        source = stepline.worker if name in stepline.worker.__all__ else stepline.producer
        assert getattr(stepline, name) is getattr(source, name), name


STORE_BUILDERS_ALLOWED = frozenset({"shared/db/stores.py", "worker/testing.py"})
"""Who may call ``create_store`` itself: ``create_store_for`` (every process's way), and the
testing kit (an embedded store on its virtual clock, no connection budget to keep)."""


def _store_builds(path: Path) -> list[str]:
    """The calls of ``create_store(...)`` in a module (``stores.create_store`` too)."""
    return [
        f"{_shown(path)}:{node.lineno}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Call) and _called_name(node.func) == "create_store"
    ]


def test_every_process_builds_its_store_with_create_store_for() -> None:
    wrong = [
        found
        for package in PACKAGES
        for path in _modules(package)
        if _shown(path) not in STORE_BUILDERS_ALLOWED
        for found in _store_builds(path)
    ]
    assert wrong == [], (
        "build a process's store with stores.create_store_for(url, settings.db, ...): it keeps "
        "STEPLINE_DATABASE__MAX_CONNECTIONS and __PGBOUNCER and names the process:\n" + "\n".join(wrong)
    )


def test_store_build_finder_can_fail(tmp_path: Path) -> None:
    module = tmp_path / "planted.py"
    module.write_text("a = create_store(url)\nb = stores.create_store(url)\nc = create_store_for(url)\n")
    assert [found.rsplit(":", 1)[1] for found in _store_builds(module)] == ["1", "2"]


def test_the_errors_long_and_transactional_steps_record_are_the_ones_stepline_exports() -> None:
    # A team matching a step's recorded error, or testing its own step code, catches these by
    # the names `stepline` gives them: the very classes the engine raises.
    import stepline
    from stepline.shared import errors

    assert stepline.HeartbeatTimeoutError is errors.HeartbeatTimeoutError
    assert stepline.TransactionEndedError is errors.TransactionEndedError
    assert issubclass(stepline.TransactionEndedError, stepline.NonRetryableError)
    assert issubclass(stepline.HeartbeatTimeoutError, stepline.SteplineError)
