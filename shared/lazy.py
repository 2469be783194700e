"""Re-exports a package resolves on first use (PEP 562), so importing it stays cheap."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, Iterable[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module ``__getattr__`` and ``__dir__`` that import each name from its module when first read.

    ``modules`` maps a module to the names it gives ``package``:
    ``__getattr__, __dir__ = lazy_exports(__name__, {"pkg.client": ["Client"]})``.
    The package keeps its ``from ... import`` lines under ``TYPE_CHECKING`` for mypy and
    editors; ``stepline --help`` then need not import SQLAlchemy or aio-pika to list commands.
    A name read once is stored in the package, so the next read is a plain attribute.
    """
    origin = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = origin.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *origin})

    return __getattr__, __dir__
