"""Worker pools: names, routing keys and queues, the pool a step records, settings, and the kit."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from stepline import Context, RetryPolicy, step_info, workflow
from stepline.producer.models import PoolWait
from stepline.producer.pool_status import pool_wait_lines
from stepline.shared.errors import ConfigError
from stepline.shared.history import History, StepRecord
from stepline.shared.settings import load_settings
from stepline.shared.states import InstanceStatus, StepKind, StepStatus
from stepline.shared.topology import (
    check_pool_name,
    parse_routing_key,
    pool_of,
    queue_name,
    routing_key,
)
from stepline.worker.cli import main as worker_main
from stepline.worker.plan import Planner
from stepline.worker.testing import WorkflowEnvironment


@pytest.fixture
def env() -> Iterator[WorkflowEnvironment]:
    environment = WorkflowEnvironment()
    yield environment
    environment.close()


# ---------------------------------------------------------------- names


def test_a_pool_step_has_its_own_routing_key_and_queue_and_the_default_pool_is_the_workflow_queue() -> None:
    assert routing_key("step", "media.render", "gpu") == "step@gpu.media.render"
    assert routing_key("step", "media.render", "default") == "step.media.render"
    assert routing_key("step", "media.render") == "step.media.render"
    assert queue_name("ns", "media.render", "gpu") == "ns.pool.gpu.media.render"
    assert (
        queue_name("ns", "media.render", "default")
        == queue_name("ns", "media.render")
        == ("ns.workflow.media.render")
    )
    assert parse_routing_key("step@gpu.media.render") == ("step", "media.render", "gpu")
    assert parse_routing_key("wake.media.render") == ("wake", "media.render", None)
    with pytest.raises(ValueError, match="only steps go to a worker pool"):
        routing_key("start", "media.render", "gpu")


@pytest.mark.parametrize("pool", ["gpu", "GPU-2", "high_mem", "a" * 40, "0"])
def test_pool_names_of_letters_digits_dash_and_underscore_are_accepted(pool: str) -> None:
    assert check_pool_name(pool) == pool


@pytest.mark.parametrize("pool", ["", "g.pu", "gpu!", "-gpu", "a" * 41, "gpu west", 7])
def test_other_pool_names_are_refused_showing_the_value_and_the_rule(pool: object) -> None:
    with pytest.raises(ValueError, match="invalid pool name") as raised:
        check_pool_name(pool)
    assert repr(pool) in str(raised.value)
    assert "letters, digits, '_' and '-'" in str(raised.value)


def test_the_pool_is_read_from_a_step_rows_detail_whatever_else_it_holds() -> None:
    assert pool_of({"pool": "gpu", "limits": [{"key": "erp"}]}) == "gpu"
    assert pool_of({"pool": "default"}) is None
    assert pool_of({"limits": []}) is None
    assert pool_of(None) is None


# ---------------------------------------------------------------- re-sends route by the row


def test_a_re_sent_step_goes_to_the_pool_its_row_records() -> None:
    record = StepRecord(
        name="infer",
        occurrence=1,
        position=0,
        kind=StepKind.STEP,
        status=StepStatus.RETRYING,
        attempt=2,
        detail={"pool": "gpu"},
    )
    history = History(
        instance_id="i-1",
        workflow="render",
        status=InstanceStatus.RUNNING,
        params=None,
        version=3,
        steps={record.key: record},
        trace_context=None,
        created_at=datetime.now(UTC),
    )
    planner = Planner(payload_limit=1 << 20)
    assert planner.step_message(history, ("infer", 1), 2)[0] == "step@gpu.render"
    # A new entry's own detail wins over the (absent) row.
    assert planner.step_message(history, ("other", 1), 1, detail={"pool": "cpu"})[0] == "step@cpu.render"
    assert planner.step_message(history, ("other", 1), 1)[0] == "step.render"


# ---------------------------------------------------------------- settings and the command line


def test_the_pools_setting_is_comma_separated_and_defaults_to_the_default_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert load_settings(require=()).worker.pools == ["default"]
    monkeypatch.setenv("STEPLINE_WORKER__POOLS", "gpu, default,gpu")
    assert load_settings(require=()).worker.pools == ["default", "gpu"]


def test_a_bad_pool_in_the_environment_is_a_configuration_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEPLINE_WORKER__POOLS", "gpu,g.pu")
    with pytest.raises(ConfigError) as raised:
        load_settings(require=())
    assert "STEPLINE_WORKER__POOLS is invalid" in str(raised.value)
    assert "invalid pool name 'g.pu'" in str(raised.value)


def test_a_bad_pool_option_stops_the_worker_at_start_up_with_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(
        worker_main, ["--pool", "gpu", "--pool", "g.pu", "--workflows", "tests.workflows"]
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("stepline-worker: --pool: invalid pool name 'g.pu'")


# ---------------------------------------------------------------- ctx.step(pool=) and the kit


async def embed(text: str) -> int:
    if step_info().attempt == 1:
        raise ConnectionError("the GPU was busy")
    return len(text)


async def shout(text: str) -> str:
    return text.upper()


@workflow("pool-kit")
async def pooled(ctx: Context, params: str) -> dict[str, object]:
    loud = await ctx.step("shout", shout, params)
    size = await ctx.step("embed", embed, loud, pool="gpu", retry=RetryPolicy(limit=3, delay="1s"))
    return {"loud": loud, "size": size}


@workflow("pool-kit-bad")
async def bad_pool(ctx: Context, params: str) -> str:
    return await ctx.step("embed", shout, "x", pool=params)


async def test_a_pool_step_runs_in_the_kit_with_its_retries(env: WorkflowEnvironment) -> None:
    run = await env.start(pooled, "hello")
    assert run.status == "complete", run.error
    assert run.output == {"loud": "HELLO", "size": 5}
    assert run.entry("embed").attempts == 2


async def test_a_bad_pool_name_fails_the_instance_naming_workflow_step_and_value(
    env: WorkflowEnvironment,
) -> None:
    run = await env.start(bad_pool, "g.pu")
    assert run.status == "errored"
    assert run.error is not None
    assert run.error["type"] == "WorkflowDefinitionError"
    assert run.error["message"].startswith(
        "workflow 'pool-kit-bad', step 'embed': invalid pool name 'g.pu': use letters, digits"
    )
    assert run.runs["embed"] == 0


# ---------------------------------------------------------------- what status says


def _wait(consumers: int | None, messages: int | None = 1) -> PoolWait:
    return PoolWait(
        step="infer", occurrence=1, pool="gpu", queue="ns.pool.gpu.w", messages=messages, consumers=consumers
    )


def test_status_warns_of_a_pool_no_worker_consumes_and_otherwise_just_names_it() -> None:
    assert pool_wait_lines([_wait(0)], None) == [
        (
            "step 'infer' waits for worker pool 'gpu': no worker consumes it now (1 ready in ns.pool.gpu.w); "
            "it runs once a `stepline-worker --pool gpu` runs",
            True,
        )
    ]
    assert pool_wait_lines([_wait(0, messages=None)], None)[0][0].endswith(
        "no worker consumes it now (not sent yet); it runs once a `stepline-worker --pool gpu` runs"
    )
    assert pool_wait_lines([_wait(2)], None) == [
        ("step 'infer' runs in worker pool 'gpu': 2 worker(s) consume it", False)
    ]
    [(line, is_warning)] = pool_wait_lines([_wait(None)], None)
    assert line.startswith("step 'infer' is bound for worker pool 'gpu' (1 ready in ns.pool.gpu.w)")
    assert not is_warning
    assert pool_wait_lines([], "cannot ask the broker") == [("note: cannot ask the broker", True)]
