"""Find the workflows defined in the modules an operator names (never what a message names)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from stepline.shared.errors import ConfigError
from stepline.worker.workflow import Workflow


def load_workflows(modules: Iterable[str]) -> dict[str, Workflow[Any, Any]]:
    """Import each module and collect the workflows it defines, by name.

    Raises:
        ConfigError: no module given, a module cannot be imported or defines no
            workflow, or two workflows share a name.
    """
    found: dict[str, Workflow[Any, Any]] = {}
    names = list(modules)
    if not names:
        raise ConfigError(
            "no workflow modules given: pass --workflows MODULE or set STEPLINE_WORKER__WORKFLOWS"
        )
    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import workflow module {module_name!r}: {exc}") from exc
        defined = [value for value in vars(module).values() if isinstance(value, Workflow)]
        if not defined:
            raise ConfigError(f"module {module_name!r} defines no @workflow")
        for item in defined:
            existing = found.get(item.name)
            if existing is not None and existing.fn is not item.fn:
                raise ConfigError(f"two workflows are named {item.name!r}: {existing!r} and {item!r}")
            found[item.name] = item
    return found
