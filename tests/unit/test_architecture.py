"""The dependency arrows and public names of the four packages, pinned.

``shared`` imports nothing of ours; ``producer``, ``worker`` and ``scheduler`` import
only ``shared``. Each package's ``__all__`` is pinned so a change to the public API
is a deliberate edit here. No module may use pickle, ``eval`` or ``exec``.
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
PACKAGES = ("shared", "worker", "scheduler", "producer")
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
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{_shown(self.path)}:{self.line} imports {self.module}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
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
        "import scheduler.timers\n"
        "from . import context\n"
        "from .. import plan\n"
        "if TYPE_CHECKING:\n"
        "    from producer import Client\n"
        "def f() -> None:\n"
        "    import shared.codec\n",
        encoding="utf-8",
    )
    found = {item.module for item in _imports(module, "worker.replay.fake")}
    assert {"scheduler.timers", "worker.replay.context", "worker.plan", "producer.Client"} <= found
    assert "shared.codec" in found
    tops = {item.top for item in _imports(module, "worker.replay.fake")}
    assert tops - ALLOWED["worker"] == {"scheduler", "producer", "typing"}


def test_import_walker_resolves_relative_imports_in_packages() -> None:
    names = {item.module for item in _imports(ROOT / "worker" / "replay" / "__init__.py")}
    assert "worker.replay.engine" in names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_only_at_allowed_packages(package: str) -> None:
    ours = set(PACKAGES)
    wrong = [
        str(item)
        for path in _modules(package)
        for item in _imports(path)
        if item.top in ours and item.top not in ALLOWED[package]
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
        "Context",
        "EventTimeoutError",
        "NonDeterminismError",
        "NonRetryableError",
        "RetryPolicy",
        "RunningStep",
        "StepFailedError",
        "StepTimeoutError",
        "SteplineError",
        "Workflow",
        "step_info",
        "workflow",
    ],
    "producer": [
        "AttemptInfo",
        "BrokerError",
        "Client",
        "ConfigError",
        "EventInfo",
        "InstanceInfo",
        "InstanceNotFoundError",
        "InvalidIdError",
        "InvalidParamsError",
        "InvalidStateError",
        "PayloadTooLargeError",
        "Producer",
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
}


@pytest.mark.parametrize("package", sorted(EXPECTED_ALL))
def test_public_names_are_pinned(package: str) -> None:
    module = importlib.import_module(package)
    exported: list[str] = list(module.__all__)
    assert sorted(exported) == EXPECTED_ALL[package]
    assert len(set(exported)) == len(exported), f"{package}.__all__ lists a name twice"
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names {name}, which it does not define"


def test_design_names_are_importable() -> None:
    from worker import Context, NonRetryableError, RetryPolicy, workflow

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
