#!/usr/bin/env bash
# PgBouncer in transaction pooling mode in front of a PostgreSQL server, with its own files.
#
#   scripts/pgbouncer.sh up      install (apt-get, if missing), write the config, start; idempotent
#   scripts/pgbouncer.sh status  whether it runs, and its pools (SHOW POOLS)
#   scripts/pgbouncer.sh down    stop it by its pid file
#
# Every database of the upstream server is reachable under its own name:
#
#   STEPLINE_DATABASE_URL=postgresql://postgres@127.0.0.1:6441/DB?pgbouncer=true
#
# (``pgbouncer=true`` turns off server-side prepared statements, which transaction
# pooling cannot keep; see docs/topology.md). Environment: STEPLINE_PGBOUNCER_PORT
# (6441), STEPLINE_PGBOUNCER_UPSTREAM (host:port, 127.0.0.1:5441),
# STEPLINE_PGBOUNCER_POOL_SIZE (server connections per database and user, 20),
# STEPLINE_PGBOUNCER_DIR (config, pid and log files, .stepline/pgbouncer).
set -euo pipefail

PORT="${STEPLINE_PGBOUNCER_PORT:-6441}"
UPSTREAM="${STEPLINE_PGBOUNCER_UPSTREAM:-127.0.0.1:5441}"
POOL_SIZE="${STEPLINE_PGBOUNCER_POOL_SIZE:-20}"
MAX_CLIENTS="${STEPLINE_PGBOUNCER_MAX_CLIENTS:-2000}"
DIR="$(realpath -m "${STEPLINE_PGBOUNCER_DIR:-.stepline/pgbouncer}")"
RUN_AS="${STEPLINE_PGBOUNCER_USER:-postgres}"
WAIT_S=30

die() { echo "pgbouncer.sh: $*" >&2; exit 1; }
say() { echo "pgbouncer.sh: $*"; }

pid() { [[ -s "$DIR/pgbouncer.pid" ]] && cat "$DIR/pgbouncer.pid"; }
# Ours runs: the pid file names a live pgbouncer (a stale file's pid may be another process's now).
running() { local p; p="$(pid)" && kill -0 "$p" 2>/dev/null && [[ "$(cat "/proc/$p/comm" 2>/dev/null)" == pgbouncer ]]; }
# Who listens on PORT (one line per socket, with its process), empty if nobody.
listeners() { ss -Hltnp "sport = :$PORT" 2>/dev/null || true; }
port_taken() { [[ -n "$(listeners)" ]] || (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
# PORT is served by process $1 (pgbouncer listens before it writes its pid file, after it forks).
serves_port() { listeners | grep -q "pid=$1,"; }

install_pgbouncer() {
    # Idempotent: nothing to do where Debian's package is installed.
    command -v pgbouncer >/dev/null 2>&1 && return
    say "installing pgbouncer (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq pgbouncer >/dev/null
    # The package starts a system-wide instance on 6432; ours is separate and leaves it alone.
}

write_config() {
    install -d -o "$RUN_AS" "$DIR"
    cat >"$DIR/pgbouncer.ini" <<EOF
; Written by scripts/pgbouncer.sh
[databases]
* = host=${UPSTREAM%:*} port=${UPSTREAM##*:}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PORT
unix_socket_dir =
auth_type = trust
admin_users = postgres
auth_file = $DIR/userlist.txt
pool_mode = transaction
default_pool_size = $POOL_SIZE
max_client_conn = $MAX_CLIENTS
server_reset_query =
; A server connection that broke (a failover) is replaced at the next transaction.
server_check_delay = 0
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
logfile = $DIR/pgbouncer.log
pidfile = $DIR/pgbouncer.pid
EOF
    echo '"postgres" ""' >"$DIR/userlist.txt"
    chown "$RUN_AS" "$DIR/pgbouncer.ini" "$DIR/userlist.txt"
}

cmd_up() {
    install_pgbouncer
    [[ "$PORT" != 6432 ]] || die "refusing port 6432 (the system-wide pgbouncer's)"
    write_config
    if running; then
        if serves_port "$(pid)"; then
            kill -HUP "$(pid)"  # re-read the config
            say "running (pid $(pid)); config reloaded"
            return
        fi
        # A reload does not move its listening socket: start it again on the new port.
        say "running (pid $(pid)) but not on port $PORT: restarting it"
        cmd_down
    fi
    rm -f "$DIR/pgbouncer.pid"
    if port_taken; then
        die "port $PORT is taken by another process (set STEPLINE_PGBOUNCER_PORT): $(listeners | tr -s ' ')"
    fi
    runuser -u "$RUN_AS" -- pgbouncer -d -q "$DIR/pgbouncer.ini" ||
        die "pgbouncer did not start (see $DIR/pgbouncer.log): $(tail -n 2 "$DIR/pgbouncer.log" 2>/dev/null)"
    # Up once our process listens on the port and answers there (pg_isready: no upstream needed).
    local deadline=$((SECONDS + WAIT_S)) p
    until p="$(pid)" && serves_port "$p" && pg_isready -q -h 127.0.0.1 -p "$PORT"; do
        if [[ -n "${p:-}" ]] && ! kill -0 "$p" 2>/dev/null; then
            die "pgbouncer exited (see $DIR/pgbouncer.log): $(tail -n 2 "$DIR/pgbouncer.log" 2>/dev/null)"
        fi
        ((SECONDS < deadline)) || die "pgbouncer did not listen on $PORT within ${WAIT_S}s (see $DIR/pgbouncer.log)"
        sleep 0.2
    done
    say "up: 127.0.0.1:$PORT -> $UPSTREAM (transaction pooling, pid $p)"
}

cmd_down() {
    if running; then
        local p deadline=$((SECONDS + WAIT_S))
        p="$(pid)"
        kill -INT "$p"  # immediate shutdown: clients are disconnected
        while kill -0 "$p" 2>/dev/null; do
            ((SECONDS < deadline)) || { kill -KILL "$p"; break; }
            sleep 0.1
        done
        say "stopped (pid $p)"
    fi
    rm -f "$DIR/pgbouncer.pid"
}

cmd_status() {
    if running; then
        echo "pgbouncer: running (pid $(pid)) on 127.0.0.1:$PORT"
        psql -X -h 127.0.0.1 -p "$PORT" -U postgres pgbouncer -c "SHOW POOLS" || true
    else
        echo "pgbouncer: not running"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) die "usage: $0 up|down|status" ;;
esac
