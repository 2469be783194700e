"""The ``@workflow`` decorator: what it accepts, and how it validates params and dumps output."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stepline.shared.errors import BadPayloadError, InvalidParamsError, WorkflowDefinitionError
from stepline.worker import Context, Workflow, workflow


class Order(BaseModel):
    sku: str
    qty: int


class Receipt(BaseModel):
    sku: str
    total: int
    lines: tuple[str, ...] = ()


@workflow("unit-api-order")
async def order_flow(ctx: Context, params: Order) -> Receipt:
    return Receipt(sku=params.sku, total=params.qty * 10)


@workflow("unit-api-count")
async def count_flow(ctx: Context, params: int) -> int:
    return params


def _decorate(name: str, fn: Any) -> Workflow[Any, Any]:
    # Through Any: the mistakes under test are also type errors, which is the point.
    decorate: Any = workflow(name)
    made: Workflow[Any, Any] = decorate(fn)
    return made


def test_decorator_returns_a_named_workflow() -> None:
    assert isinstance(order_flow, Workflow)
    assert order_flow.name == "unit-api-order"
    assert order_flow.fn.__name__ == "order_flow"
    assert "unit-api-order" in repr(order_flow)


def test_plain_function_is_refused() -> None:
    def not_async(ctx: Context, params: Order) -> Receipt:
        raise AssertionError("never called")

    with pytest.raises(WorkflowDefinitionError, match=r"workflow 'sync-flow' must be an async function"):
        _decorate("sync-flow", not_async)


def test_plain_function_returning_a_coroutine_is_refused() -> None:
    async def inner(ctx: Context, params: Order) -> None:
        return None

    def wrapper(ctx: Context, params: Order) -> Any:
        return inner(ctx, params)

    with pytest.raises(WorkflowDefinitionError, match=r"must be an async function"):
        _decorate("wrapped", wrapper)


@pytest.mark.parametrize("arity", [0, 1, 3])
def test_wrong_arity_is_refused(arity: int) -> None:
    async def no_args() -> None:
        return None

    async def one_arg(ctx: Context) -> None:
        return None

    async def three_args(ctx: Context, params: Order, extra: int) -> None:
        return None

    fn = {0: no_args, 1: one_arg, 3: three_args}[arity]
    with pytest.raises(WorkflowDefinitionError) as caught:
        _decorate("arity", fn)
    assert str(caught.value) == (
        f"workflow 'arity' must take exactly (ctx, params), it takes {arity} parameters"
    )


@pytest.mark.parametrize("name", ["has space", "", "-leading", "a" * 201, "slash/name", "naïve"])
def test_invalid_workflow_names_are_refused(name: str) -> None:
    async def flow(ctx: Context, params: None) -> None:
        return None

    with pytest.raises((ValueError, WorkflowDefinitionError), match=r"invalid workflow name"):
        _decorate(name, flow)


@pytest.mark.parametrize("name", ["a", "order-fulfilment", "billing.v2", "Nightly_Report-3", "w" * 200])
def test_valid_workflow_names_are_accepted(name: str) -> None:
    async def flow(ctx: Context, params: None) -> None:
        return None

    assert _decorate(name, flow).name == name


def test_validate_params_builds_the_model() -> None:
    params = order_flow.validate_params({"sku": "A-1", "qty": "3"})
    assert params == Order(sku="A-1", qty=3)


def test_validate_params_names_the_missing_field() -> None:
    with pytest.raises(InvalidParamsError) as caught:
        order_flow.validate_params({"sku": "A-1"})
    error = caught.value
    assert str(error) == "invalid params for workflow 'unit-api-order': qty: Field required"
    assert error.workflow == "unit-api-order"
    assert "qty" in error.detail
    # Bad params are a bad payload: a start event carrying them is dead-lettered with this reason.
    assert isinstance(error, BadPayloadError)
    assert error.reason == str(error)


def test_validate_params_names_every_bad_field() -> None:
    with pytest.raises(InvalidParamsError) as caught:
        order_flow.validate_params({"sku": 5, "qty": "many"})
    assert "sku: Input should be a valid string" in str(caught.value)
    assert "qty: Input should be a valid integer" in str(caught.value)


def test_validate_params_refuses_a_non_object() -> None:
    with pytest.raises(InvalidParamsError, match=r"\(root\): Input should be a valid dictionary"):
        order_flow.validate_params(None)


def test_plain_typed_params() -> None:
    assert count_flow.validate_params("7") == 7
    with pytest.raises(InvalidParamsError, match=r"unit-api-count.*valid integer"):
        count_flow.validate_params("seven")


def test_encode_params_of_a_model_instance_gives_json() -> None:
    assert order_flow.encode_params(Order(sku="A-1", qty=2)) == {"sku": "A-1", "qty": 2}


def test_encode_params_accepts_a_plain_dict() -> None:
    assert order_flow.encode_params({"sku": "A-1", "qty": 2}) == {"sku": "A-1", "qty": 2}


def test_encode_params_validates_before_publishing() -> None:
    with pytest.raises(InvalidParamsError, match=r"qty: Field required"):
        order_flow.encode_params({"sku": "A-1"})


def test_encode_params_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(InvalidParamsError, match=r"not JSON-serialisable: object is not JSON-serialisable"):
        order_flow.encode_params(object())


def test_dump_output_of_a_model() -> None:
    receipt = Receipt(sku="A-1", total=20, lines=("a", "b"))
    assert order_flow.dump_output(receipt) == {"sku": "A-1", "total": 20, "lines": ["a", "b"]}


def test_dump_output_refuses_what_json_cannot_hold() -> None:
    @workflow("unit-api-any")
    async def any_flow(ctx: Context, params: None) -> Any:
        return None

    with pytest.raises(WorkflowDefinitionError, match=r"'unit-api-any' returned a value that is not JSON"):
        any_flow.dump_output({"when": object()})
