#!/usr/bin/env bash
# A PostgreSQL primary and a streaming standby with synchronous replication, on this machine.
#
#   scripts/postgres-standby.sh up        make (from nothing) and start both; idempotent
#   scripts/postgres-standby.sh failover  stop the primary with -m immediate, promote the standby
#   scripts/postgres-standby.sh status    what runs where, who is primary, the replication state
#   scripts/postgres-standby.sh down      stop and drop both clusters (their data is gone)
#
# Two Debian clusters (pg_createcluster), each with its own port and data directory.
# The primary names the standby in synchronous_standby_names: a commit returns only
# once the standby has it on disk, so a failover loses no acknowledged commit (and a
# primary whose standby is down waits in COMMIT until it is back). Point Stepline at both:
#
#   STEPLINE_DATABASE_URL=postgresql://postgres@127.0.0.1:5441,127.0.0.1:5442/DB?target_session_attrs=read-write
#
# Both clusters trust local TCP connections (a test pair, not a production setup).
# The names and ports come from the environment; the shared cluster "main" and its
# port 5432 are refused, so this script can never stop or promote them.
set -euo pipefail

PG_VERSION="${STEPLINE_PG_VERSION:-}"
PRIMARY="${STEPLINE_PG_PRIMARY:-stepline_primary}"
PRIMARY_PORT="${STEPLINE_PG_PRIMARY_PORT:-5441}"
STANDBY="${STEPLINE_PG_STANDBY:-stepline_standby}"
STANDBY_PORT="${STEPLINE_PG_STANDBY_PORT:-5442}"
HOST=127.0.0.1
WAIT_S="${STEPLINE_PG_WAIT_S:-60}"

die() { echo "postgres-standby: $*" >&2; exit 1; }
say() { echo "postgres-standby: $*"; }

install_postgresql() {
    # Idempotent: nothing to do where the Debian tools are already installed.
    if command -v pg_createcluster >/dev/null 2>&1; then
        return
    fi
    say "installing PostgreSQL (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql postgresql-contrib >/dev/null
}

pick_version() {
    if [[ -z "$PG_VERSION" ]]; then
        PG_VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"
    fi
    [[ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]] || die "PostgreSQL $PG_VERSION is not installed"
}

check_names() {
    for name in "$PRIMARY" "$STANDBY"; do
        [[ "$name" != main ]] || die "refusing to touch the cluster 'main' (set STEPLINE_PG_PRIMARY/STANDBY)"
    done
    for port in "$PRIMARY_PORT" "$STANDBY_PORT"; do
        [[ "$port" != 5432 ]] || die "refusing port 5432 (the shared server; set STEPLINE_PG_*_PORT)"
    done
    [[ "$PRIMARY" != "$STANDBY" && "$PRIMARY_PORT" != "$STANDBY_PORT" ]] || die "primary and standby must differ"
}

exists() { [[ -f "/etc/postgresql/$PG_VERSION/$1/postgresql.conf" ]]; }
running() { pg_ctlcluster "$PG_VERSION" "$1" status >/dev/null 2>&1; }
psql_at() { psql -X -q -t -A -h "$HOST" -p "$1" -U postgres -d postgres -c "$2"; }
data_dir() { echo "/var/lib/postgresql/$PG_VERSION/$1"; }
conf_dir() { echo "/etc/postgresql/$PG_VERSION/$1"; }

wait_ready() {
    local port=$1 deadline=$((SECONDS + WAIT_S))
    until pg_isready -q -h "$HOST" -p "$port"; do
        ((SECONDS < deadline)) || die "PostgreSQL on port $port did not answer within ${WAIT_S}s"
        sleep 0.2
    done
}

write_common_conf() {
    # Our own conf.d file and pg_hba.conf: the cluster's postgresql.conf stays Debian's.
    local name=$1 port=$2
    install -d -o postgres -g postgres "$(conf_dir "$name")/conf.d"
    cat >"$(conf_dir "$name")/conf.d/stepline.conf" <<EOF
# Written by scripts/postgres-standby.sh
port = $port
listen_addresses = '$HOST'
ssl = off
max_connections = ${STEPLINE_PG_MAX_CONNECTIONS:-100}
shared_buffers = 32MB
wal_level = replica
max_wal_senders = 5
wal_keep_size = 256MB
hot_standby = on
EOF
    cat >"$(conf_dir "$name")/pg_hba.conf" <<EOF
# Written by scripts/postgres-standby.sh: a local test pair trusts local connections.
local   all          all                   trust
host    all          all   $HOST/32        trust
host    replication  all   $HOST/32        trust
EOF
    chown postgres:postgres "$(conf_dir "$name")/conf.d/stepline.conf" "$(conf_dir "$name")/pg_hba.conf"
}

make_primary() {
    if ! exists "$PRIMARY"; then
        say "creating the primary $PG_VERSION/$PRIMARY on port $PRIMARY_PORT"
        pg_createcluster -q "$PG_VERSION" "$PRIMARY" -p "$PRIMARY_PORT" --start-conf=manual >/dev/null
    fi
    write_common_conf "$PRIMARY" "$PRIMARY_PORT"
    # A commit waits for the standby's flush (synchronous_commit = on, the default).
    echo "synchronous_standby_names = '$STANDBY'" >>"$(conf_dir "$PRIMARY")/conf.d/stepline.conf"
    running "$PRIMARY" || pg_ctlcluster "$PG_VERSION" "$PRIMARY" start
    wait_ready "$PRIMARY_PORT"
    [[ "$(psql_at "$PRIMARY_PORT" 'SELECT pg_is_in_recovery()')" == f ]] \
        || die "$PRIMARY on port $PRIMARY_PORT is in recovery: not a primary"
    psql_at "$PRIMARY_PORT" "SELECT pg_reload_conf()" >/dev/null
}

make_standby() {
    if ! exists "$STANDBY"; then
        say "creating the standby $PG_VERSION/$STANDBY on port $STANDBY_PORT (a base backup of the primary)"
        pg_createcluster -q "$PG_VERSION" "$STANDBY" -p "$STANDBY_PORT" --start-conf=manual >/dev/null
        local dir
        dir="$(data_dir "$STANDBY")"
        find "$dir" -mindepth 1 -delete
        runuser -u postgres -- pg_basebackup -h "$HOST" -p "$PRIMARY_PORT" -U postgres -D "$dir" -X stream -c fast
        runuser -u postgres -- touch "$dir/standby.signal"
    fi
    write_common_conf "$STANDBY" "$STANDBY_PORT"
    # application_name is the name the primary's synchronous_standby_names waits for.
    echo "primary_conninfo = 'host=$HOST port=$PRIMARY_PORT user=postgres application_name=$STANDBY'" \
        >>"$(conf_dir "$STANDBY")/conf.d/stepline.conf"
    running "$STANDBY" || pg_ctlcluster "$PG_VERSION" "$STANDBY" start
    wait_ready "$STANDBY_PORT"
}

wait_streaming() {
    local deadline=$((SECONDS + WAIT_S)) state=""
    while ((SECONDS < deadline)); do
        state="$(psql_at "$PRIMARY_PORT" "SELECT sync_state FROM pg_stat_replication WHERE application_name = '$STANDBY'" || true)"
        [[ "$state" == sync ]] && return
        sleep 0.2
    done
    die "the standby does not stream synchronously from the primary (sync_state: '${state:-none}')"
}

cmd_up() {
    install_postgresql
    pick_version
    check_names
    if exists "$STANDBY" && running "$STANDBY" \
        && [[ "$(psql_at "$STANDBY_PORT" 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; then
        die "the pair has failed over ($STANDBY is a primary now): run 'down' then 'up' for a new pair"
    fi
    make_primary
    make_standby
    wait_streaming
    say "up: primary $HOST:$PRIMARY_PORT, synchronous standby $HOST:$STANDBY_PORT"
    say "STEPLINE_DATABASE_URL=postgresql://postgres@$HOST:$PRIMARY_PORT,$HOST:$STANDBY_PORT/postgres?target_session_attrs=read-write"
}

cmd_failover() {
    pick_version
    check_names
    exists "$STANDBY" || die "no standby $PG_VERSION/$STANDBY: run 'up' first"
    if running "$PRIMARY"; then
        say "stopping the primary $PRIMARY with -m immediate (as a crash would)"
        pg_ctlcluster "$PG_VERSION" "$PRIMARY" stop -m immediate
    fi
    say "promoting $STANDBY"
    pg_ctlcluster "$PG_VERSION" "$STANDBY" promote
    local deadline=$((SECONDS + WAIT_S))
    until [[ "$(psql_at "$STANDBY_PORT" 'SELECT pg_is_in_recovery()' 2>/dev/null)" == f ]]; do
        ((SECONDS < deadline)) || die "$STANDBY was not promoted within ${WAIT_S}s"
        sleep 0.2
    done
    say "failover done: $HOST:$STANDBY_PORT is the primary"
}

cmd_status() {
    pick_version
    check_names
    for entry in "$PRIMARY:$PRIMARY_PORT" "$STANDBY:$STANDBY_PORT"; do
        local name=${entry%%:*} port=${entry##*:} role
        if ! exists "$name"; then
            echo "$name ($port): absent"
        elif ! running "$name"; then
            echo "$name ($port): stopped"
        else
            role="$(psql_at "$port" "SELECT CASE WHEN pg_is_in_recovery() THEN 'standby' ELSE 'primary' END")"
            echo "$name ($port): running, $role"
            psql_at "$port" "SELECT '  streams to ' || application_name || ' (' || state || ', ' || sync_state || ')' FROM pg_stat_replication" || true
        fi
    done
}

cmd_down() {
    pick_version
    check_names
    for name in "$STANDBY" "$PRIMARY"; do
        if exists "$name"; then
            # --stop: a running cluster is stopped first (pg_dropcluster refuses one otherwise).
            pg_dropcluster --stop "$PG_VERSION" "$name"
            say "dropped $PG_VERSION/$name"
        fi
        # pg_dropcluster leaves the files it did not write (ours, in conf.d).
        rm -rf "$(conf_dir "$name")"
    done
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    failover) cmd_failover ;;
    status) cmd_status ;;
    *) die "usage: $0 up|down|failover|status" ;;
esac
