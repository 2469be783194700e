"""retry_until: the start-up wait for a service, and how a stop ends it."""

from __future__ import annotations

import asyncio

import pytest

from stepline.shared.retrying import StopRequested, retry_until


async def test_an_attempt_that_hangs_is_cancelled_when_the_process_is_asked_to_stop() -> None:
    stopping = asyncio.Event()
    started = asyncio.Event()
    cancelled = []

    async def connect() -> None:  # a connect to a host that never answers
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    waiting = asyncio.create_task(
        retry_until(connect, what="RabbitMQ", deadline_s=3600, retry_on=(OSError,), stopping=stopping)
    )
    await started.wait()
    stopping.set()
    with pytest.raises(StopRequested, match="asked to stop while waiting for RabbitMQ"):
        await waiting
    assert cancelled == [True]


async def test_a_stop_during_the_back_off_ends_the_wait_before_the_next_attempt() -> None:
    stopping = asyncio.Event()
    attempts = []

    async def connect() -> None:
        attempts.append(True)
        stopping.set()  # the signal arrives while this attempt fails
        raise OSError("connection refused")

    with pytest.raises(StopRequested):
        await retry_until(connect, what="PostgreSQL", deadline_s=3600, retry_on=(OSError,), stopping=stopping)
    assert len(attempts) == 1


async def test_without_a_stop_the_last_error_is_raised_at_the_deadline() -> None:
    attempts = []

    async def connect() -> None:
        attempts.append(True)
        raise OSError("connection refused")

    with pytest.raises(OSError, match="connection refused"):
        await retry_until(connect, what="PostgreSQL", deadline_s=0.5, retry_on=(OSError,))
    assert len(attempts) >= 2


async def test_a_final_error_is_raised_at_the_first_attempt_however_long_the_deadline() -> None:
    attempts = []

    async def connect() -> None:
        attempts.append(True)
        raise OSError("certificate verify failed")

    with pytest.raises(OSError, match="certificate verify failed"):
        await retry_until(
            connect,
            what="PostgreSQL",
            deadline_s=3600,
            retry_on=(OSError,),
            is_final=lambda exc: "certificate" in str(exc),
        )
    assert len(attempts) == 1
