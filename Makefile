# stepline developer front door. Every target is idempotent.
#   make test   - what CI runs: setup + services + lint + typecheck + pytest (in parallel, then the serial tests)
#   make run    - the main job: the example workflows end to end, embedded (no services needed)
#   make run-stack - the same on PostgreSQL + RabbitMQ

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

VENV ?= .venv
BIN  := $(VENV)/bin
PY   := $(BIN)/python

# Local service settings (override on the command line or in the environment).
STEPLINE_DB_NAME ?= stepline
STEPLINE_VHOST   ?= stepline
STEPLINE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/$(STEPLINE_DB_NAME)
STEPLINE_AMQP_URL     ?= amqp://guest:guest@127.0.0.1:5672/$(STEPLINE_VHOST)
STEPLINE_EMBEDDED     ?= .stepline/demo
export STEPLINE_DB_NAME STEPLINE_VHOST

PYTEST_ARGS ?=

.PHONY: help setup services browser lint format typecheck test run run-stack chaos chaos-cluster chaos-failover chaos-pgbouncer bench bench-scaling clean distclean

help: ## Show this help
	@echo "stepline make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'
	@echo
	@echo "Variables: PYTEST_ARGS='...' TEST_WORKERS=4 STEPLINE_DATABASE_URL=... STEPLINE_AMQP_URL=..."

setup: ## Create .venv and install stepline + dev deps (when pyproject.toml changed)
	@VENV='$(VENV)' bash scripts/setup.sh

services: ## Start PostgreSQL + RabbitMQ if needed; create database and vhost
	@bash scripts/services.sh

browser: ## Install headless Chromium + chromedriver for the dashboard's browser test (Debian packages)
	@bash scripts/browser.sh

lint: setup ## ruff check + ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff formatting and autofixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: setup ## mypy (configured in pyproject.toml)
	$(BIN)/mypy

# The suite mostly waits on I/O, so it runs in TEST_WORKERS processes (pytest-xdist); each
# process makes its own vhosts and template database. Tests marked `serial` restart the shared
# PostgreSQL or RabbitMQ under everyone's feet: they run alone, after the rest.
TEST_WORKERS ?= 4
# The local RabbitMQ is a single dev node: classic queues, set explicitly (quorum is the default
# elsewhere). The suite makes a vhost per 60 tests and ~30 queues per test, and RabbitMQ 3.10 wedged
# deleting vhosts full of quorum queues; its quorum tests use small vhosts of their own.
SINGLE_NODE_ENV = STEPLINE_BROKER__QUEUE_TYPE=classic
TEST_ENV = STEPLINE_EMBEDDED= STEPLINE_DATABASE_URL='$(STEPLINE_DATABASE_URL)' STEPLINE_AMQP_URL='$(STEPLINE_AMQP_URL)' $(SINGLE_NODE_ENV)

test: setup services browser lint typecheck ## Everything CI runs: lint, typecheck, full pytest suite
	$(TEST_ENV) $(BIN)/pytest -n $(TEST_WORKERS) -m 'not serial and not cluster' $(PYTEST_ARGS)
	@# Exit 5 is "none collected": PYTEST_ARGS may name tests that hold no serial one.
	$(TEST_ENV) $(BIN)/pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

run: setup ## The main job: the example workflows end to end, embedded (SQLite files, no services)
	STEPLINE_EMBEDDED='$(STEPLINE_EMBEDDED)' $(PY) -m examples.demo

run-stack: setup services ## The same demo on PostgreSQL + RabbitMQ (started if down)
	STEPLINE_EMBEDDED= STEPLINE_DATABASE_URL='$(STEPLINE_DATABASE_URL)' STEPLINE_AMQP_URL='$(STEPLINE_AMQP_URL)' \
		$(SINGLE_NODE_ENV) $(PY) -m examples.demo

CHAOS_DURATION ?= 600
chaos: setup services ## Long chaos run: faults for CHAOS_DURATION seconds (default 600), then checks
	$(PY) -m tests.chaos.run --duration $(CHAOS_DURATION)

CLUSTER_INSTANCES ?= 300
# Needs PostgreSQL only (it makes its own database); the cluster is started and stopped by the run.
chaos-cluster: setup ## Chaos on a 3-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh): leader SIGKILLed, restarted, another node stopped
	$(TEST_ENV) $(BIN)/pytest tests/cluster $(PYTEST_ARGS)
	$(PY) -m tests.chaos.cluster --instances $(CLUSTER_INSTANCES)

FAILOVER_INSTANCES ?= 300
chaos-failover: setup services ## Failover run: FAILOVER_INSTANCES (300) chaos instances while the primary dies (ports 5441/5442)
	$(PY) -m tests.chaos.failover --instances $(FAILOVER_INSTANCES)
	$(PY) -m tests.chaos.pgbouncer_fleet

# 12 workers with concurrency 16 and a scheduler through PgBouncer (6441) in front of the pair's
# primary (5441): the throughput workload to completion, each process's connections counted in
# PgBouncer's SHOW CLIENTS and PostgreSQL's pg_stat_activity. The run stops every process it
# started by pid; `timeout` (SIGINT, which runs that cleanup) bounds it past its own deadline.
PGBOUNCER_INSTANCES ?= 600
PGBOUNCER_DEADLINE ?= 1800
chaos-pgbouncer: setup services ## 12 workers x 16 through PgBouncer: PGBOUNCER_INSTANCES (600) throughput instances within every connection budget
	timeout -s INT -k 120 $$(( $(PGBOUNCER_DEADLINE) + 1200 )) $(PY) -m tests.chaos.pgbouncer_fleet \
		--workload throughput --instances $(PGBOUNCER_INSTANCES) --deadline $(PGBOUNCER_DEADLINE)

bench: setup services ## Run the benchmarks (python -m benchmarks)
	STEPLINE_DATABASE_URL='$(STEPLINE_DATABASE_URL)' STEPLINE_AMQP_URL='$(STEPLINE_AMQP_URL)' \
		$(PY) -m benchmarks

# docs/scaling.md: the database work per step on a PostgreSQL cluster of its own (port
# SCALING_PG_PORT, pg_stat_statements preloaded; the shared server is never reconfigured), then
# what one classic, quorum and stream queue carries, on a vhost of its own. About 15 minutes.
SCALING_PG_PORT ?= 6541
bench-scaling: setup services ## docs/scaling.md's figures: database work per step (own PostgreSQL), one queue's rate
	STEPLINE_AMQP_URL='$(STEPLINE_AMQP_URL)' $(PY) -m benchmarks.db_cost --port $(SCALING_PG_PORT)
	STEPLINE_AMQP_URL='$(STEPLINE_AMQP_URL)' $(PY) -m benchmarks.queue_rate

clean: ## Remove caches (.pytest_cache, .mypy_cache, .ruff_cache, __pycache__); keeps .venv
	rm -rf .pytest_cache .mypy_cache .ruff_cache
	find . -path './$(VENV)' -prune -o -path ./.git -prune -o -type d -name __pycache__ -print0 | \
		xargs -0 rm -rf

distclean: clean ## clean + remove the virtualenv
	rm -rf '$(VENV)'
