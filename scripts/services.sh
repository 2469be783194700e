#!/usr/bin/env bash
# Ensure the local PostgreSQL and RabbitMQ that stepline needs are running,
# and that the stepline database and RabbitMQ vhost exist.
#
# Idempotent: when everything is already up it only checks, and costs about
# three short probes plus one rabbitmqctl call.
#
# Environment:
#   STEPLINE_DB_NAME   PostgreSQL database to create (default: stepline)
#   STEPLINE_VHOST     RabbitMQ vhost to create      (default: stepline)
#   PG_HOST / PG_PORT / PG_USER   (default: 127.0.0.1 / 5432 / postgres)
#   PG_VERSION / PG_CLUSTER       cluster to start (default: newest in /etc/postgresql / main)
#   PG_START_TIMEOUT   seconds to wait for PostgreSQL (default: 60)
#   RABBIT_START_TIMEOUT seconds to wait for RabbitMQ (default: 120)
set -euo pipefail

DB_NAME="${STEPLINE_DB_NAME:-stepline}"
VHOST="${STEPLINE_VHOST:-stepline}"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
PG_USER="${PG_USER:-postgres}"
PG_CLUSTER="${PG_CLUSTER:-main}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"
RABBIT_START_TIMEOUT="${RABBIT_START_TIMEOUT:-120}"
RABBIT_USER=guest
LOG_DIR="${TMPDIR:-/tmp}"

say() { printf 'services: %s\n' "$*"; }
die() { printf 'services: ERROR: %s\n' "$*" >&2; exit 1; }

# Show the tail of a start log on failure, so the reason is visible in CI.
show_log() {
    if [[ -s "$1" ]]; then
        printf 'services: --- last lines of %s ---\n' "$1" >&2
        tail -n 20 "$1" >&2 || true
    fi
}

# wait_until <timeout-seconds> <description> <command...>
wait_until() {
    local timeout=$1 what=$2
    shift 2
    local start=$SECONDS
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 1
    done
    say "$what is up (waited $((SECONDS - start))s)"
}

for tool in pg_isready psql rabbitmqctl rabbitmq-diagnostics; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
done

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------
pg_up() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }

if pg_up; then
    say "PostgreSQL is running on $PG_HOST:$PG_PORT"
else
    if [[ -z "${PG_VERSION:-}" ]]; then
        PG_VERSION="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
        [[ -n "$PG_VERSION" ]] || die "no PostgreSQL cluster found under /etc/postgresql"
    fi
    pg_log="$LOG_DIR/stepline-postgres-start.log"
    say "PostgreSQL not answering on $PG_HOST:$PG_PORT; starting cluster $PG_VERSION/$PG_CLUSTER"
    # stdio goes to a file so that no daemon keeps the caller's pipes open.
    if ! pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start \
        </dev/null >"$pg_log" 2>&1; then
        # It may have been started concurrently; the wait below decides.
        say "pg_ctlcluster start returned non-zero; waiting anyway"
    fi
    if ! wait_until "$PG_START_TIMEOUT" "PostgreSQL" pg_up; then
        show_log "$pg_log"
        die "PostgreSQL did not accept connections on $PG_HOST:$PG_PORT within ${PG_START_TIMEOUT}s"
    fi
fi

# --------------------------------------------------------------------------
# RabbitMQ
# --------------------------------------------------------------------------
rabbit_ping() { rabbitmq-diagnostics -q ping; }
rabbit_ports() { rabbitmq-diagnostics -q check_port_connectivity; }

if rabbit_ports >/dev/null 2>&1; then
    say "RabbitMQ is running (AMQP port reachable)"
else
    rabbit_log="$LOG_DIR/stepline-rabbitmq-start.log"
    if rabbit_ping >/dev/null 2>&1; then
        # Node is alive but the app is stopped (e.g. after `rabbitmqctl stop_app`).
        say "RabbitMQ node is up but its listeners are not; running rabbitmqctl start_app"
        rabbitmqctl -q start_app </dev/null >"$rabbit_log" 2>&1 ||
            say "rabbitmqctl start_app returned non-zero; waiting anyway"
    else
        say "RabbitMQ not answering; starting it with rabbitmq-server -detached"
        rabbitmq-server -detached </dev/null >"$rabbit_log" 2>&1 ||
            say "rabbitmq-server -detached returned non-zero; waiting anyway"
    fi
    if ! wait_until "$RABBIT_START_TIMEOUT" "RabbitMQ" rabbit_ports; then
        show_log "$rabbit_log"
        die "RabbitMQ did not become reachable within ${RABBIT_START_TIMEOUT}s (see rabbitmq-diagnostics status)"
    fi
fi

# --------------------------------------------------------------------------
# PostgreSQL database
# --------------------------------------------------------------------------
# The name is passed as a psql variable and quoted by psql (:'x' / :"x"),
# so arbitrary names are safe. psql does not interpolate variables in -c,
# hence the here-strings.
pg_psql() {
    psql -X -q -v ON_ERROR_STOP=1 -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d postgres \
        -v dbname="$DB_NAME" -v dbowner="$PG_USER" "$@"
}

db_exists="$(pg_psql -tA <<<"SELECT 1 FROM pg_database WHERE datname = :'dbname';")" ||
    die "could not query PostgreSQL as $PG_USER@$PG_HOST:$PG_PORT"
if [[ "$db_exists" == "1" ]]; then
    say "database '$DB_NAME' exists"
else
    say "creating database '$DB_NAME' (owner $PG_USER)"
    pg_psql <<<"CREATE DATABASE :\"dbname\" OWNER :\"dbowner\";" ||
        die "could not create database '$DB_NAME'"
fi

# --------------------------------------------------------------------------
# RabbitMQ vhost + permissions for guest
# --------------------------------------------------------------------------
# One rabbitmqctl call covers the common case: if guest already has full
# permissions on the vhost, the vhost exists and nothing else is needed.
perms="$(rabbitmqctl -q -s list_user_permissions "$RABBIT_USER" 2>&1)" ||
    die "rabbitmqctl list_user_permissions $RABBIT_USER failed: $perms"
if printf '%s\n' "$perms" | awk -F'\t' -v v="$VHOST" '
        $1 == v && $2 == ".*" && $3 == ".*" && $4 == ".*" { found = 1 }
        END { exit !found }'; then
    say "vhost '$VHOST' exists and $RABBIT_USER has full permissions on it"
else
    if rabbitmqctl -q -s list_vhosts name | grep -qxF -- "$VHOST"; then
        say "vhost '$VHOST' exists"
    else
        say "creating vhost '$VHOST'"
        rabbitmqctl -q add_vhost "$VHOST" >/dev/null || die "could not create vhost '$VHOST'"
    fi
    say "granting $RABBIT_USER full permissions on vhost '$VHOST'"
    rabbitmqctl -q set_permissions -p "$VHOST" "$RABBIT_USER" ".*" ".*" ".*" >/dev/null ||
        die "could not set permissions for $RABBIT_USER on vhost '$VHOST'"
fi

say "ready: postgresql://$PG_USER@$PG_HOST:$PG_PORT/$DB_NAME  amqp://$RABBIT_USER@127.0.0.1:5672/$VHOST"
