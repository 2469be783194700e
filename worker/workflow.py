"""The ``@workflow`` decorator and the Workflow it makes: a name, a function, typed params."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar, get_type_hints

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from stepline.shared import codec
from stepline.shared.codec import JSON
from stepline.shared.errors import InvalidParamsError, WorkflowDefinitionError
from stepline.shared.messages import check_workflow_name, format_validation_error
from stepline.shared.schedules import InvalidScheduleError, Schedule, declared_ids
from stepline.worker.concurrency import Concurrency

if TYPE_CHECKING:
    from stepline.worker.context import Context

ParamsT = TypeVar("ParamsT")
OutputT = TypeVar("OutputT")

_ANY_ADAPTER: TypeAdapter[Any] = TypeAdapter(Any)


class Workflow(Generic[ParamsT, OutputT]):
    """A registered workflow: what ``@workflow(name)`` returns.

    Pass it to ``Producer.start`` to have params validated before they are
    published; give its module to ``stepline-worker --workflows`` to run it.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[Context, ParamsT], Awaitable[OutputT]],
        *,
        schedules: Sequence[Schedule] = (),
        concurrency: Concurrency | None = None,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise WorkflowDefinitionError(f"workflow {name!r} must be an async function")
        parameters = list(inspect.signature(fn).parameters.values())
        if len(parameters) != 2:
            raise WorkflowDefinitionError(
                f"workflow {name!r} must take exactly (ctx, params), it takes {len(parameters)} parameters"
            )
        try:
            self.name = check_workflow_name(name)
        except ValueError as exc:
            raise WorkflowDefinitionError(str(exc)) from None
        self.fn = fn
        if concurrency is not None and not isinstance(concurrency, Concurrency):
            raise WorkflowDefinitionError(
                f"workflow {name!r}: concurrency must be a Concurrency(...) or None, got {concurrency!r}"
            )
        self.concurrency = None if concurrency is None else concurrency.check(name)
        """How many instances may run at once (per key), or None for no limit."""
        try:
            hints = get_type_hints(fn)
        except NameError as exc:
            raise WorkflowDefinitionError(
                f"workflow {name!r}: cannot resolve its type annotations ({exc}); "
                "define the params and output types at module level"
            ) from None
        self._params_adapter: TypeAdapter[Any] = TypeAdapter(hints.get(parameters[1].name, Any))
        self._output_adapter: TypeAdapter[Any] = TypeAdapter(hints.get("return", Any))
        self._result_adapters: dict[Callable[..., Any], TypeAdapter[Any]] = {}
        self._type_adapters: dict[Any, TypeAdapter[Any]] = {}
        self.schedules: tuple[Schedule, ...] = self._check_schedules(schedules)

    def _check_schedules(self, schedules: Sequence[Schedule]) -> tuple[Schedule, ...]:
        """The declared schedules with their ids, each one's params valid for this workflow."""
        named = declared_ids(self.name, list(schedules))
        for schedule in named:
            try:
                self.validate_params(schedule.params)
            except InvalidParamsError as exc:
                raise InvalidScheduleError(
                    "params", schedule.params, f"do not fit the workflow: {exc.detail}", workflow=self.name
                ) from None
        return tuple(named)

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r} {self.fn.__module__}.{self.fn.__qualname__}>"

    def validate_params(self, raw: JSON) -> ParamsT:
        """Params as the workflow function receives them.

        Raises:
            InvalidParamsError: the params do not fit the function's annotation.
        """
        try:
            params: ParamsT = self._params_adapter.validate_python(raw)
        except ValidationError as exc:
            raise InvalidParamsError(self.name, format_validation_error(exc)) from None
        return params

    def encode_params(self, params: object) -> JSON:
        """Params as a payload for a start event (``codec.escape``d), validated first.

        Raises:
            InvalidParamsError: not JSON-serialisable, or not valid for this workflow.
        """
        try:
            raw = codec.to_jsonable(params)
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(self.name, f"not JSON-serialisable: {exc}") from None
        self.validate_params(raw)
        return codec.escape(raw)

    def dump_output(self, value: object) -> JSON:
        """The workflow's return value as a payload (JSON, ``codec.escape``d)."""
        try:
            return codec.to_payload(self._output_adapter.dump_python(value, mode="json"))
        except (TypeError, ValueError) as exc:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} returned a value that is not JSON-serialisable: {exc}"
            ) from None

    @property
    def params_adapter(self) -> TypeAdapter[Any]:
        """Validates params as the workflow function's annotation says (``stepline schema`` prints it)."""
        return self._params_adapter

    @property
    def output_adapter(self) -> TypeAdapter[Any]:
        """Rebuilds the workflow's stored output as its declared return type."""
        return self._output_adapter

    def type_adapter(self, hint: Any) -> TypeAdapter[Any]:
        """A cached adapter for ``hint`` (an event payload type); building one costs more than a replay."""
        adapter = self._type_adapters.get(hint)
        if adapter is None:
            adapter = self._type_adapters[hint] = TypeAdapter(hint)
        return adapter

    def result_adapter(self, fn: Callable[..., Any]) -> TypeAdapter[Any]:
        """Rebuilds a step's stored JSON result as the type its function declares."""
        adapter = self._result_adapters.get(fn)
        if adapter is None:
            adapter = _adapter_for_return(fn)
            self._result_adapters[fn] = adapter
        return adapter


def _adapter_for_return(fn: Callable[..., Any]) -> TypeAdapter[Any]:
    """Plain JSON when the return type is absent or not something pydantic can rebuild.

    A type pydantic cannot describe still runs; the executor then reports the
    result as not JSON-serialisable, naming the step.
    """
    try:
        hint = get_type_hints(fn).get("return", Any)
        if hint in (Any, None, type(None)):
            return _ANY_ADAPTER
        return TypeAdapter(hint)
    except (NameError, TypeError, PydanticSchemaGenerationError):
        return _ANY_ADAPTER


def workflow(
    name: str,
    *,
    schedules: Sequence[Schedule] = (),
    concurrency: Concurrency | None = None,
) -> Callable[[Callable[[Context, ParamsT], Awaitable[OutputT]]], Workflow[ParamsT, OutputT]]:
    """Declare an async function ``(ctx, params) -> output`` as the workflow ``name``.

    The params annotation (a pydantic model, or any type pydantic knows) is
    validated at start; the return value must be JSON-serialisable.

    ``schedules`` start instances on a clock (``[Schedule("0 2 * * *")]``);
    workers serving the workflow write them to the database when they start
    (see ``stepline.worker.schedules``). ``concurrency`` limits how many
    instances run at once, fleet-wide (see ``Concurrency``).

    Raises:
        InvalidScheduleError: a schedule's params do not fit the workflow, or two share an id.
    """

    def decorate(fn: Callable[[Context, ParamsT], Awaitable[OutputT]]) -> Workflow[ParamsT, OutputT]:
        return Workflow(name, fn, schedules=schedules, concurrency=concurrency)

    return decorate
