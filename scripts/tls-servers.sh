#!/usr/bin/env bash
# A PostgreSQL cluster and a RabbitMQ node that speak TLS only, with a throwaway CA.
#
#   scripts/tls-servers.sh up       make the CA and certificates (once), start both (idempotent)
#   scripts/tls-servers.sh down     stop both by their pids (idempotent)
#   scripts/tls-servers.sh status   print what runs, and the settings that reach it
#   scripts/tls-servers.sh destroy  down, then remove the cluster, the node's data and the certificates
#
# Both servers ask for a client certificate signed by the same CA:
#   PostgreSQL  cluster $PG_VERSION/stepline_tls on 127.0.0.1:5451, ssl=on, TCP only as
#               `hostssl ... clientcert=verify-full` (the certificate's CN is the user: postgres);
#               the local socket trusts, for creating databases.
#   RabbitMQ    node stepline-tls@localhost, run as the rabbitmq user with its Erlang cookie:
#               a plain listener on 5690, TLS on 5691 (verify_peer, fail_if_no_peer_cert),
#               distribution on 25690, data and logs under $DIR/rabbitmq, no plugins.
# Certificates ($DIR/certs): ca.pem, server.pem/-key.pem (localhost, 127.0.0.1, ::1),
# client.pem/-key.pem (CN=postgres), and other-ca.pem, a CA that signed nothing of these.
#
# Environment:
#   STEPLINE_TLS_DIR   where certificates, data and logs go (default: /tmp/stepline-tls)
#   TLS_PG_PORT / TLS_AMQP_PORT / TLS_AMQPS_PORT / TLS_DIST_PORT   (default: 5451 / 5690 / 5691 / 25690)
#   TLS_TIMEOUT        seconds to wait for a server to start or stop (default: 90)
set -euo pipefail

DIR="${STEPLINE_TLS_DIR:-/tmp/stepline-tls}"
CERTS="$DIR/certs"
PG_VERSION="${PG_VERSION:-15}"
PG_CLUSTER=stepline_tls
PG_PORT="${TLS_PG_PORT:-5451}"
AMQP_PORT="${TLS_AMQP_PORT:-5690}"
AMQPS_PORT="${TLS_AMQPS_PORT:-5691}"
DIST_PORT="${TLS_DIST_PORT:-25690}"
TIMEOUT="${TLS_TIMEOUT:-90}"
NODE=stepline-tls@localhost
RUN_AS=rabbitmq
RABBIT_HOME="$DIR/rabbitmq"
PIDFILE="$RABBIT_HOME/rabbit.pid"

say() { printf 'tls-servers: %s\n' "$*"; }
die() { printf 'tls-servers: ERROR: %s\n' "$*" >&2; exit 1; }

check_tools() {
    local tool
    for tool in openssl pg_createcluster pg_ctlcluster pg_isready psql runuser; do
        command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found on PATH"
    done
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || die "RabbitMQ is not installed (/usr/lib/rabbitmq/bin)"
    [[ "$(id -u)" == 0 ]] || die "run this as root: it starts PostgreSQL as postgres and RabbitMQ as $RUN_AS"
    USER_HOME="$(getent passwd "$RUN_AS" | cut -d: -f6)"
    [[ -f "$USER_HOME/.erlang.cookie" ]] || die "no Erlang cookie at $USER_HOME/.erlang.cookie"
}

# ---------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------
make_ca() { # make_ca NAME SUBJECT
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "$2" \
        -keyout "$CERTS/$1-key.pem" -out "$CERTS/$1.pem" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
}

make_leaf() { # make_leaf NAME SUBJECT EXTENSIONS
    openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$CERTS/$1-key.pem" -out "$CERTS/$1.csr" 2>/dev/null
    printf '%s\n' "$3" >"$CERTS/$1.ext"
    openssl x509 -req -in "$CERTS/$1.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca-key.pem" -CAcreateserial \
        -days 30 -extfile "$CERTS/$1.ext" -out "$CERTS/$1.pem" 2>/dev/null
    rm -f "$CERTS/$1.csr" "$CERTS/$1.ext"
}

make_certificates() {
    [[ -s "$CERTS/client.pem" ]] && return 0
    say "making a throwaway CA and certificates in $CERTS"
    mkdir -p "$CERTS"
    chmod 755 "$DIR" "$CERTS"
    make_ca ca "/CN=Stepline test CA"
    make_ca other-ca "/CN=Some other CA"
    make_leaf server "/CN=localhost" \
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
extendedKeyUsage=serverAuth"
    make_leaf client "/CN=postgres" "extendedKeyUsage=clientAuth"
    chmod 600 "$CERTS"/*-key.pem
}

# ---------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------
pg_data() { printf '/var/lib/postgresql/%s/%s' "$PG_VERSION" "$PG_CLUSTER"; }
pg_conf() { printf '/etc/postgresql/%s/%s' "$PG_VERSION" "$PG_CLUSTER"; }
pg_pid() {
    local file
    file="$(pg_data)/postmaster.pid"
    [[ -s "$file" ]] || return 1
    local pid
    pid="$(head -n 1 "$file")"
    kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

pg_create() {
    [[ -d "$(pg_conf)" ]] && return 0
    say "creating PostgreSQL cluster $PG_VERSION/$PG_CLUSTER on port $PG_PORT"
    # Manual start: the machine's postgresql service must never start (or stop) this test server.
    pg_createcluster "$PG_VERSION" "$PG_CLUSTER" -p "$PG_PORT" --start-conf=manual -- --auth-local=trust >/dev/null
}

pg_configure() {
    local data conf
    data="$(pg_data)"
    conf="$(pg_conf)"
    # The server reads its key only when it is the postgres user's and private.
    install -o postgres -g postgres -m 644 "$CERTS/server.pem" "$data/server.pem"
    install -o postgres -g postgres -m 600 "$CERTS/server-key.pem" "$data/server-key.pem"
    install -o postgres -g postgres -m 644 "$CERTS/ca.pem" "$data/ca.pem"
    cat >"$conf/conf.d/stepline-tls.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
max_connections = 40
ssl = on
ssl_cert_file = '$data/server.pem'
ssl_key_file = '$data/server-key.pem'
ssl_ca_file = '$data/ca.pem'
EOF
    cat >"$conf/pg_hba.conf" <<EOF
# The socket trusts (scripts/tls-servers.sh creates databases through it); TCP is TLS with a
# client certificate whose CN is the user, or nothing.
local   all all                   trust
hostssl all all 127.0.0.1/32      trust clientcert=verify-full
EOF
    chown postgres:postgres "$conf/conf.d/stepline-tls.conf" "$conf/pg_hba.conf"
}

pg_up() {
    pg_create
    pg_configure
    if pg_pid >/dev/null; then
        pg_ctlcluster "$PG_VERSION" "$PG_CLUSTER" reload
        return 0
    fi
    say "starting PostgreSQL $PG_VERSION/$PG_CLUSTER (ssl=on, 127.0.0.1:$PG_PORT)"
    timeout "$TIMEOUT" pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" "$PG_CLUSTER" start \
        -- -t "$TIMEOUT" </dev/null >"$DIR/postgres-start.log" 2>&1 ||
        { tail -n 20 "$DIR/postgres-start.log" >&2; die "PostgreSQL did not start (log above)"; }
}

pg_down() {
    local pid
    pid="$(pg_pid)" || return 0
    say "stopping PostgreSQL $PG_VERSION/$PG_CLUSTER (pid $pid)"
    kill -INT "$pid" 2>/dev/null || true # fast shutdown
    wait_gone "$pid" || kill -QUIT "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------
as_rabbit() {
    runuser -u "$RUN_AS" -- env -i \
        HOME="$USER_HOME" PATH="$PATH" \
        RABBITMQ_NODENAME="$NODE" \
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
        RABBITMQ_NODE_PORT="$AMQP_PORT" \
        RABBITMQ_DIST_PORT="$DIST_PORT" \
        RABBITMQ_CONFIG_FILE="$RABBIT_HOME/rabbitmq.conf" \
        RABBITMQ_CONF_ENV_FILE="$RABBIT_HOME/rabbitmq-env.conf" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$RABBIT_HOME/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$RABBIT_HOME/mnesia" \
        RABBITMQ_MNESIA_DIR="$RABBIT_HOME/mnesia/$NODE" \
        RABBITMQ_LOG_BASE="$RABBIT_HOME/log" \
        RABBITMQ_PID_FILE="$PIDFILE" \
        ERL_EPMD_ADDRESS=127.0.0.1 \
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$@"
}

rabbit_pid() {
    [[ -s "$PIDFILE" ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$PIDFILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

rabbit_configure() {
    mkdir -p "$RABBIT_HOME/mnesia" "$RABBIT_HOME/log"
    install -m 644 "$CERTS/ca.pem" "$RABBIT_HOME/ca.pem"
    install -m 644 "$CERTS/server.pem" "$RABBIT_HOME/server.pem"
    install -m 600 "$CERTS/server-key.pem" "$RABBIT_HOME/server-key.pem"
    cat >"$RABBIT_HOME/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:$AMQP_PORT
listeners.ssl.local = 127.0.0.1:$AMQPS_PORT
ssl_options.cacertfile = $RABBIT_HOME/ca.pem
ssl_options.certfile = $RABBIT_HOME/server.pem
ssl_options.keyfile = $RABBIT_HOME/server-key.pem
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
loopback_users.guest = true
log.console = false
log.file.level = info
EOF
    : >"$RABBIT_HOME/rabbitmq-env.conf"
    printf '[].\n' >"$RABBIT_HOME/enabled_plugins" # no management listener to collide with the shared node's
    chown -R "$RUN_AS:" "$RABBIT_HOME"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

rabbit_up() {
    rabbit_configure
    rabbit_pid >/dev/null && return 0
    rm -f "$PIDFILE"
    say "starting RabbitMQ $NODE (AMQP 127.0.0.1:$AMQP_PORT, AMQPS 127.0.0.1:$AMQPS_PORT, distribution $DIST_PORT)"
    as_rabbit setsid /usr/lib/rabbitmq/bin/rabbitmq-server </dev/null >"$RABBIT_HOME/log/startup.log" 2>&1 &
    disown || true
    local deadline=$((SECONDS + TIMEOUT))
    until rabbit_pid >/dev/null && port_open "$AMQPS_PORT"; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$RABBIT_HOME/log/startup.log" >&2 || true
            die "$NODE did not start within ${TIMEOUT}s (logs: $RABBIT_HOME/log)"
        fi
        sleep 1
    done
}

rabbit_down() {
    local pid
    pid="$(rabbit_pid)" || return 0
    say "stopping RabbitMQ $NODE (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true # the node stops cleanly on SIGTERM
    wait_gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$PIDFILE"
}

wait_gone() { # wait_gone PID -> fails if it still runs after TIMEOUT
    local deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

status() {
    local pid
    if pid="$(pg_pid)"; then
        say "PostgreSQL $PG_VERSION/$PG_CLUSTER runs (pid $pid): postgresql://postgres@localhost:$PG_PORT/DB"
    else
        say "PostgreSQL $PG_VERSION/$PG_CLUSTER is stopped"
    fi
    if pid="$(rabbit_pid)"; then
        say "RabbitMQ $NODE runs (pid $pid): amqps://guest:guest@localhost:$AMQPS_PORT/"
    else
        say "RabbitMQ $NODE is stopped"
    fi
    if [[ -s "$CERTS/ca.pem" ]]; then
        say "STEPLINE_TLS__CA_FILE=$CERTS/ca.pem STEPLINE_TLS__CERT_FILE=$CERTS/client.pem" \
            "STEPLINE_TLS__KEY_FILE=$CERTS/client-key.pem"
    fi
}

case "${1:-}" in
up)
    check_tools
    mkdir -p "$DIR"
    make_certificates
    pg_up
    rabbit_up
    status
    ;;
down)
    check_tools
    rabbit_down
    pg_down
    status
    ;;
status)
    check_tools
    status
    ;;
destroy)
    check_tools
    rabbit_down
    pg_down
    [[ -d "$(pg_conf)" ]] && pg_dropcluster "$PG_VERSION" "$PG_CLUSTER"
    rm -rf "$DIR"
    say "removed $PG_VERSION/$PG_CLUSTER and $DIR"
    ;;
*)
    die "usage: $0 up|down|status|destroy"
    ;;
esac
