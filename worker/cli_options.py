"""Click options that several worker-side commands share; light at import (click only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def workflow_modules_option(help_text: str) -> Callable[[F], F]:
    """``--workflows MODULE`` (required, repeatable), passed to the command as ``modules``."""
    return click.option(
        "--workflows", "modules", multiple=True, required=True, metavar="MODULE", help=help_text
    )
