"""The run's RabbitMQ vhosts: a fresh one every so many tests, the full ones deleted in the background.

Each test makes some thirty queues in its own namespace. One vhost for a whole
run grew to ten thousand queues per test process, and deleting it took half a
minute at the end of the run, when nothing else was left to do. So the run moves
to a new vhost every ``TESTS_PER_VHOST`` tests and deletes the full one in a
thread while the next tests run: only the last, small vhost is deleted at the end.
A test only ever uses the vhost it was given, and tests of one process run one
after the other, so a vhost is deleted only after the last test that used it.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from tests.support import services

TESTS_PER_VHOST = 60
"""Tests per vhost: about 1,800 queues, which RabbitMQ deletes in a few seconds."""


class RunVhosts:
    """The vhosts of one test process: ``for_test`` gives each test the current one."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._made = 0
        self._given = 0
        # One thread makes the next vhost while another deletes a full one.
        self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vhosts")
        self._current = self._create()
        self._next = self._threads.submit(self._create)
        self._retired: list[Future[tuple[str, int]]] = []

    def for_test(self) -> str:
        """The vhost for the next test (a fresh one once the current one served ``TESTS_PER_VHOST``)."""
        if self._given >= TESTS_PER_VHOST:
            full, self._current = self._current, self._next.result()
            self._next = self._threads.submit(self._create)
            self._retired.append(self._threads.submit(self._retire, full))
            self._given = 0
        self._given += 1
        return self._current

    def close(self) -> dict[str, int]:
        """Delete every vhost of the run; returns those that held quorum queues, with how many."""
        self._retired.append(self._threads.submit(self._retire, self._current))
        # Made ahead and never given to a test (the pool started making it before this deletion).
        unused = self._threads.submit(self._remove_made, self._next)
        self._threads.shutdown(wait=True)
        try:
            held = dict(future.result() for future in self._retired)  # raises the first failure
        finally:
            unused.result()
        return {name: count for name, count in held.items() if count}

    def _create(self) -> str:
        self._made += 1
        name = f"{self._prefix}-{self._made}"
        services.create_vhost(name)
        return name

    @staticmethod
    def _remove_made(made: Future[str]) -> None:
        services.remove_vhost(made.result())

    @staticmethod
    def _retire(name: str) -> tuple[str, int]:
        """Delete a vhost the run is done with; returns it with how many quorum queues it held."""
        try:
            return name, services.delete_quorum_queues(name)
        finally:
            services.remove_vhost(name)
