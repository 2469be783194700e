"""One validated settings tree, read from STEPLINE_* environment variables."""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from stepline.shared.amqp_url import parse_amqp_url
from stepline.shared.durations import parse_duration
from stepline.shared.errors import ConfigError
from stepline.shared.tls import TlsFiles, amqp_url_with_tls, database_url_with_tls
from stepline.shared.topology import DEFAULT_POOL, check_pool_name

BUILD_ID_MAX_LENGTH = 64
"""The longest build id a worker may be given (``STEPLINE_WORKER__BUILD_ID``)."""

DurationSetting = Annotated[timedelta, BeforeValidator(parse_duration)]
"""A duration setting: ``"250ms"``, ``"30s"``, ``"5 minutes"`` or a number of seconds."""


class BrokerSettings(BaseModel):
    """``STEPLINE_BROKER__*``: queues and the AMQP connection."""

    queue_type: Literal["classic", "quorum"] = Field(
        default="quorum",
        description="Type of the queues this process creates: quorum (replicated over a cluster, with a "
        "delivery limit and dead-lettering; the default) or classic (set it for a single dev node). "
        "Queues that exist are used as they are, either type.",
    )
    delivery_limit: int = Field(
        default=20,
        ge=1,
        description="Quorum queues: deliveries of one message before RabbitMQ dead-letters it.",
    )
    heartbeat_s: int = Field(
        default=30,
        ge=0,
        le=600,
        description="AMQP heartbeat; a dead peer is noticed within about twice this.",
    )


class TlsSettings(BaseModel):
    """``STEPLINE_TLS__*``: the CA and client certificate of both connections (PostgreSQL and amqps://).

    An option the URL sets itself (libpq's ``sslrootcert``/``sslmode``/``sslcert``/``sslkey``,
    aio-pika's ``cafile``/``certfile``/``keyfile``) wins over these for that connection.
    """

    ca_file: FilePath | None = Field(
        default=None,
        description="PEM CA bundle that must have signed the servers' certificates; PostgreSQL "
        "then connects with sslmode=verify-full unless its URL names another sslmode.",
    )
    cert_file: FilePath | None = Field(
        default=None, description="PEM client certificate, for servers that ask for one (with KEY_FILE)."
    )
    key_file: FilePath | None = Field(
        default=None, description="PEM private key of CERT_FILE (unencrypted; readable by this user only)."
    )

    @model_validator(mode="after")
    def _certificate_with_its_key(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("STEPLINE_TLS__CERT_FILE and STEPLINE_TLS__KEY_FILE must be set together")
        return self

    @property
    def files(self) -> TlsFiles:
        """The three files, for the URL helpers in ``stepline.shared.tls``."""
        return TlsFiles(ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file)


class DatabaseSettings(BaseModel):
    """``STEPLINE_DATABASE__*``: this process's PostgreSQL connections (see docs/topology.md)."""

    max_connections: int | None = Field(
        default=None,
        ge=2,
        le=10_000,
        description="Most PostgreSQL connections this process opens at once (default: a worker's "
        "concurrency + 2, a scheduler 6, a client 8); past it, callers wait for one to come free.",
    )
    pgbouncer: bool = Field(
        default=False,
        description="The URL goes through PgBouncer in transaction pooling mode: no server-side "
        "prepared statements (also ?pgbouncer=true in STEPLINE_DATABASE_URL).",
    )

    def budget(self, default: int) -> int:
        """The connection bound of a process whose own default is ``default``."""
        return self.max_connections if self.max_connections is not None else default


WORKER_SPARE_CONNECTIONS = 2
"""A worker's default budget is its concurrency plus these (the sweeper, limits, health checks)."""
SCHEDULER_CONNECTIONS = 6
"""A scheduler's default budget: its timer, schedule, reconcile, sweep and limit loops."""
CLIENT_PROCESS = "stepline-client"
"""How a ``Client`` (and the ``stepline`` command reading the database) is named in ``pg_stat_activity``."""
CLIENT_CONNECTIONS = 8
"""A ``Client``'s (and the ``stepline`` command's) default budget."""
CLIENT_HELD_CONNECTIONS = 1
"""Of them, kept out of the pool for single statements (``Client.get``): no pre-ping, BEGIN or ROLLBACK."""


class WorkerSettings(BaseModel):
    """``STEPLINE_WORKER__*``: the step-running processes."""

    concurrency: int = Field(default=16, ge=1, le=1024, description="Steps run at once per worker.")
    prefetch: int | None = Field(
        default=None, ge=1, description="Unacked deliveries per queue (default: 2 x concurrency)."
    )
    default_step_timeout: DurationSetting = Field(
        default=timedelta(minutes=10),
        description="Timeout of a step that names none; keep it below RabbitMQ's consumer_timeout.",
    )
    max_step_timeout: DurationSetting = Field(
        default=timedelta(minutes=25),
        description="Longest step timeout allowed; keep it below RabbitMQ's consumer_timeout (30 min).",
    )
    shutdown_grace: DurationSetting = Field(
        default=timedelta(seconds=30), description="How long SIGTERM waits for in-flight steps."
    )
    replay_cache_size: int = Field(
        default=1024,
        ge=0,
        description="Instances whose suspended replay a worker keeps for their next step (0: none).",
    )
    commit_batch: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Concurrent steps' commits sent together in one statement, at most (1: each alone).",
    )
    start_batch: int = Field(
        default=100,
        ge=1,
        le=10_000,
        description="Starts a worker behind on them writes in one statement, at most (1: one at a time).",
    )
    workflows: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Modules that define workflows (comma-separated)."
    )
    pools: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_POOL],
        description="Worker pools whose steps it runs (comma-separated; default: the default pool). "
        "Starts, wakes, events and resumes go to default-pool workers only.",
    )
    build_id: str | None = Field(
        default=None,
        max_length=BUILD_ID_MAX_LENGTH,
        description="Recorded on the instances it starts and the attempts it runs "
        "(default: a hash of the workflow modules' source).",
    )

    @field_validator("workflows", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("pools", mode="before")
    @classmethod
    def _split_pools(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("pools")
    @classmethod
    def _check_pools(cls, value: list[str]) -> list[str]:
        if not value:
            return [DEFAULT_POOL]
        # The pool names are what a user typed: shown, as they are not secrets.
        return sorted({check_pool_name(pool) for pool in value})

    @field_validator("build_id")
    @classmethod
    def _printable_build_id(cls, value: str | None) -> str | None:
        # It is printed in tables and matched exactly by `list --build`: one visible token.
        if value is None or value == "":
            return None
        if not value.isprintable() or value != value.strip():
            raise ValueError("must be printable text without leading or trailing spaces")
        return value

    @model_validator(mode="after")
    def _default_within_max(self) -> WorkerSettings:
        if self.default_step_timeout > self.max_step_timeout:
            raise ValueError(
                "STEPLINE_WORKER__DEFAULT_STEP_TIMEOUT must not exceed STEPLINE_WORKER__MAX_STEP_TIMEOUT"
            )
        return self


class SchedulerSettings(BaseModel):
    """``STEPLINE_SCHEDULER__*``: the timer-firing processes."""

    poll_interval: DurationSetting = Field(
        default=timedelta(milliseconds=500), description="Longest wait between timer scans."
    )
    batch_size: int = Field(default=2500, ge=1, description="Timers fired per transaction.")
    reconcile_interval: DurationSetting = Field(
        default=timedelta(seconds=60),
        description="How often the reconciler looks for stranded instances (0 turns it off).",
    )
    reconcile_grace: DurationSetting = Field(
        default=timedelta(minutes=5),
        description="How long nothing may move an unfinished instance before the reconciler repairs it.",
    )


class LimitsSettings(BaseModel):
    """``STEPLINE_LIMITS__*``: step limits (``RateLimit``, ``ConcurrencyLimit``)."""

    lease: DurationSetting = Field(
        default=timedelta(seconds=30),
        description="How long a concurrency slot outlives a worker that stopped renewing it "
        "(renewed every third of it while its step runs).",
    )
    reserve: int | None = Field(
        default=None,
        ge=0,
        le=1024,
        description="Slots a worker takes at once, as a reserve it serves steps from without a "
        "statement each, on a concurrency key far from its limit (default: the worker's "
        "concurrency; 0: none, every step takes its own slot).",
    )

    @model_validator(mode="after")
    def _lease_long_enough(self) -> LimitsSettings:
        if self.lease < timedelta(seconds=1):
            raise ValueError("STEPLINE_LIMITS__LEASE must be at least 1 second")
        return self


class PayloadSettings(BaseModel):
    """``STEPLINE_PAYLOAD__*``: large payloads, stored once in the ``payloads`` table (docs/payloads.md)."""

    offload_above: int = Field(
        default=256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="A step result, params or event payload (sent by the Client) larger than this many "
        "bytes of JSON is stored once, compressed, in the payloads table; its row and message hold "
        "a reference.",
    )
    max_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1024,
        le=1024 * 1024 * 1024,
        description="Largest step result, params or event payload accepted (offloaded); "
        "messages keep STEPLINE_MAX_PAYLOAD_BYTES.",
    )


class OutboxSettings(BaseModel):
    """``STEPLINE_OUTBOX__*``: the relay that republishes rows a crash left behind."""

    sweep_interval: DurationSetting = Field(
        default=timedelta(seconds=2), description="How often the sweeper looks for old rows."
    )
    sweep_after: DurationSetting = Field(
        default=timedelta(seconds=5),
        description="Age at which an unsent row is taken over from the fast path.",
    )
    batch_size: int = Field(default=200, ge=1, description="Rows republished per sweep.")

    @model_validator(mode="after")
    def _sweeps_within_the_age(self) -> OutboxSettings:
        # Each sweep refreshes the rows its worker holds (see OutboxRelay.hold): sweeping
        # less often than sweep_after would let other sweepers take them over.
        if self.sweep_interval >= self.sweep_after:
            raise ValueError(
                "STEPLINE_OUTBOX__SWEEP_INTERVAL must be shorter than STEPLINE_OUTBOX__SWEEP_AFTER"
            )
        return self


class UiSettings(BaseModel):
    """``STEPLINE_UI__*``: the web dashboard (``stepline ui``)."""

    host: str = Field(default="127.0.0.1", description="Address the dashboard binds (loopback by default).")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the dashboard (0: any free one).")
    token: SecretStr | None = Field(
        default=None,
        description="When set, every request needs it: a login form asks for it once and sets a cookie.",
    )
    read_only: bool = Field(default=False, description="Hide every action and refuse action requests.")


class Settings(BaseSettings):
    """Every setting of every Stepline process.

    ``STEPLINE_DATABASE_URL`` is a plain ``postgresql://`` URL (the psycopg
    driver is implied); ``STEPLINE_AMQP_URL`` an ``amqp://`` or ``amqps://``
    URL, with the vhost as its path. ``STEPLINE_EMBEDDED`` names a directory
    instead, for the embedded mode: SQLite files in place of both services.
    """

    model_config = SettingsConfigDict(
        env_prefix="STEPLINE_",
        env_nested_delimiter="__",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
    )

    database_url: SecretStr | None = Field(
        default=None, description="PostgreSQL URL, postgresql://user:pw@host/db (required)"
    )
    amqp_url: SecretStr | None = Field(
        default=None, description="RabbitMQ URL, amqp://user:pw@host:5672/vhost (required)"
    )
    embedded: Path | None = Field(
        default=None,
        description="Embedded mode: keep state and queue in SQLite files in this directory "
        "instead of PostgreSQL and RabbitMQ (the two URLs are then ignored).",
    )
    namespace: str = Field(
        default="stepline",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$",
        description="Prefix of every exchange and queue name.",
    )
    codec: str | None = Field(
        default=None,
        description="Payload codec, as an import path (e.g. stepline.AesGcmCodec): seals params, results, "
        "outputs and events at rest and on the wire. Unset: payloads are plain JSON.",
    )
    codec_keys: SecretStr | None = Field(
        default=None,
        description="The AES-GCM codec's keys, id:base64key pairs, comma-separated, the encrypting key "
        "first (every key listed still decrypts).",
    )
    max_payload_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest params, event or message accepted (step results: STEPLINE_PAYLOAD__MAX_BYTES).",
    )
    jaeger_url: str | None = Field(
        default=None,
        description="Jaeger UI base URL; `stepline history` then links each instance's trace",
    )
    health_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Serve /livez and /readyz on this port (workers and schedulers); unset: off.",
    )
    startup_timeout: DurationSetting = Field(
        default=timedelta(seconds=60),
        description="How long workers and schedulers wait for PostgreSQL and RabbitMQ at start-up "
        "before they exit 3.",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log lines as text or JSON.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Log level of workers and schedulers."
    )
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    # ``STEPLINE_DATABASE__*``; named ``db`` here because ``database`` is the URL property below.
    db: DatabaseSettings = Field(
        default_factory=DatabaseSettings, validation_alias=AliasChoices("database", "stepline_database")
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _case(cls, value: Any, info: Any) -> Any:
        if isinstance(value, str):
            return value.lower() if info.field_name == "log_format" else value.upper()
        return value

    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    payload: PayloadSettings = Field(default_factory=PayloadSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    @field_validator("startup_timeout")
    @classmethod
    def _positive_startup_timeout(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s (e.g. 60s)")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        scheme = text.split("://", 1)[0] if "://" in text else ""
        if scheme not in ("postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError("must start with postgresql:// (e.g. postgresql://user@host:5432/db)")
        return value

    @field_validator("amqp_url")
    @classmethod
    def _check_amqp_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        # One node, or several of one cluster (amqp://u:p@h1:5672,h2:5672/vhost); errors omit the password.
        parse_amqp_url(value.get_secret_value())
        return value

    @field_validator("jaeger_url")
    @classmethod
    def _check_jaeger_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        base = value.strip().rstrip("/")
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", base):
            raise ValueError(
                "must start with http:// or https:// and name a host (e.g. http://localhost:16686)"
            )
        return base

    @property
    def database(self) -> str:
        """The database URL with ``STEPLINE_TLS__*`` applied (load with ``require=("database_url",)``)."""
        if self.embedded is not None:
            return f"sqlite:///{(self.embedded / EMBEDDED_DATABASE).resolve()}"
        if self.database_url is None:
            raise ConfigError("configuration error: STEPLINE_DATABASE_URL is not set")
        return database_url_with_tls(self.database_url.get_secret_value(), self.tls.files)

    @property
    def amqp(self) -> str:
        """The broker URL with ``STEPLINE_TLS__*`` applied (load with ``require=("amqp_url",)``)."""
        if self.embedded is not None:
            return f"sqlite:///{(self.embedded / EMBEDDED_QUEUE).resolve()}"
        if self.amqp_url is None:
            raise ConfigError("configuration error: STEPLINE_AMQP_URL is not set")
        return amqp_url_with_tls(self.amqp_url.get_secret_value(), self.tls.files)


BOTH_URLS = ("database_url", "amqp_url")
EMBEDDED_DATABASE = "stepline.db"
"""The embedded mode's state (instances, steps, timers, outbox), inside ``STEPLINE_EMBEDDED``."""
EMBEDDED_QUEUE = "queue.db"
"""The embedded mode's message queue, inside ``STEPLINE_EMBEDDED``."""


def load_settings(*, require: tuple[str, ...] = BOTH_URLS, **overrides: Any) -> Settings:
    """Read and validate the settings once, reporting every problem in one message.

    Args:
        require: top-level settings this process cannot run without.
        overrides: values given on the command line; they win over the environment.

    Raises:
        ConfigError: a variable is missing or malformed; the text names each one.
    """
    problems: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems.extend(describe_problems(exc))
    except SettingsError as exc:
        problems.append(str(exc))
    for name in require:
        variable = f"STEPLINE_{name.upper()}"
        missing = getattr(settings, name) is None if settings else not os.environ.get(variable)
        if name in BOTH_URLS and settings is not None and settings.embedded is not None:
            missing = False  # the embedded mode's files stand in for both services
        if missing and name not in overrides:
            problems.append(f"{variable} is not set")
    if problems or settings is None:
        raise ConfigError("configuration error: " + "; ".join(problems))
    return settings


def describe_problems(exc: ValidationError) -> list[str]:
    """Name each bad or missing environment variable; values are never shown."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        parts = [str(part) for part in error["loc"]]
        if parts and parts[0] in ("db", "stepline_database"):
            parts[0] = "database"  # the field ``db`` is read from STEPLINE_DATABASE__*
        variable = "STEPLINE_" + "__".join(parts).upper()
        if error["type"] == "missing":
            problems.append(f"{variable} is not set")
        else:
            problems.append(f"{variable} is invalid: {error['msg']}")
    return problems


__all__ = [
    "CLIENT_CONNECTIONS",
    "CLIENT_HELD_CONNECTIONS",
    "SCHEDULER_CONNECTIONS",
    "WORKER_SPARE_CONNECTIONS",
    "DatabaseSettings",
    "DurationSetting",
    "OutboxSettings",
    "PayloadSettings",
    "SchedulerSettings",
    "Settings",
    "TlsSettings",
    "UiSettings",
    "WorkerSettings",
    "describe_problems",
    "load_settings",
]
