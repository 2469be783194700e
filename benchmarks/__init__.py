"""Stepline's benchmark: ``python -m benchmarks`` (``make bench``).

It measures the engine on the local PostgreSQL and RabbitMQ, in a database and
a vhost of its own that it creates and drops, against two references measured
in the same run: the naive step loop (``benchmarks.naive``) and the raw rate of
its transaction. See docs/benchmarks.md for what each
figure means.
"""
