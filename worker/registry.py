"""Find the workflows defined in the modules an operator names (never what a message names)."""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
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


BUILD_ID_LENGTH = 12
"""Hex digits of the default build id: short to read, long enough that two builds do not collide."""


def source_build_id(workflows: Mapping[str, Workflow[Any, Any]], modules: Iterable[str] = ()) -> str:
    """The default build id: a short SHA-256 of the source of the modules that define the workflows.

    The modules are the ones named (``--workflows``) and those the workflow
    functions are defined in (a named module may import them from another),
    hashed in name order with each name, so the id is the same on every
    machine and every start of the same code, and changes with any byte of
    it. Modules those import are not covered: a build id from the deploy
    (``STEPLINE_WORKER__BUILD_ID``, e.g. the git commit) covers everything.
    """
    names = {*modules, *(workflow.fn.__module__ for workflow in workflows.values())}
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        digest.update(_source(name) + b"\0")
    return digest.hexdigest()[:BUILD_ID_LENGTH]


def _source(module_name: str) -> bytes:
    """A loaded module's source file as bytes; empty for a module without one (built in, frozen)."""
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return b""
    try:
        return Path(file).read_bytes()
    except OSError:  # gone since it was imported (a deploy replacing files): its name still counts
        return b""
