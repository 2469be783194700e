"""``Concurrency``: how many instances of a workflow (per key) may run at once, and what happens past it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stepline.shared.errors import ConcurrencyKeyError, WorkflowDefinitionError
from stepline.shared.slots import ON_LIMIT_CHOICES, WHOLE_WORKFLOW_KEY, OnLimit

MAX_KEY_LENGTH = 200
"""The longest concurrency key a key function may return."""


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most ``limit`` started, unfinished instances of the workflow per key, fleet-wide.

    ``key`` is a function of the validated params returning a string (a
    customer id, say: ``key=lambda order: order.customer_id``), or None for one
    limit over the whole workflow. ``on_limit`` says what a start past the
    limit does: ``"queue"`` (it waits with status ``queued`` and starts when a
    slot frees, highest priority first, then oldest), ``"cancel-newest"`` (it
    ends ``terminated`` at once, with the reason) or ``"cancel-oldest"`` (the
    oldest instance of its key is terminated, with the reason, and it starts).

    Checked when ``@workflow`` declares it (``WorkflowDefinitionError``).
    """

    limit: int
    key: Callable[[Any], str] | None = None
    on_limit: OnLimit = "queue"

    def check(self, workflow: str) -> Concurrency:
        """This declaration, if it is valid for ``workflow``.

        Raises:
            WorkflowDefinitionError: naming the workflow and the bad value.
        """
        limit = self.limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise WorkflowDefinitionError(
                f"workflow {workflow!r}: Concurrency limit must be an int of 1 or more, got {limit!r}"
            )
        if self.on_limit not in ON_LIMIT_CHOICES:
            choices = ", ".join(repr(choice) for choice in ON_LIMIT_CHOICES)
            raise WorkflowDefinitionError(
                f"workflow {workflow!r}: Concurrency on_limit must be one of {choices}, got {self.on_limit!r}"
            )
        if self.key is not None and not callable(self.key):
            raise WorkflowDefinitionError(
                f"workflow {workflow!r}: Concurrency key must be a function of the params or None, "
                f"got {self.key!r}"
            )
        return self

    def key_of(self, workflow: str, params: object) -> str:
        """The key of an instance with these (validated) params.

        Raises:
            ConcurrencyKeyError: the key function raised, or returned something
                other than a string of at most ``MAX_KEY_LENGTH`` characters.
        """
        if self.key is None:
            return WHOLE_WORKFLOW_KEY
        try:
            key = self.key(params)
        except Exception as exc:  # the user's function: any failure refuses the start, with its cause
            raise ConcurrencyKeyError(workflow, f"it raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(key, str):
            raise ConcurrencyKeyError(workflow, f"it returned {type(key).__name__} {key!r}, not a str")
        if len(key) > MAX_KEY_LENGTH:
            raise ConcurrencyKeyError(
                workflow,
                f"it returned a key of {len(key)} characters, over {MAX_KEY_LENGTH}: {key[:40]!r}...",
            )
        return key
