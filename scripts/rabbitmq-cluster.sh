#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, for the cluster tests and `make chaos-cluster`.
#
#   scripts/rabbitmq-cluster.sh up            start every node that is down, join them into one cluster
#   scripts/rabbitmq-cluster.sh down          stop every node (rabbitmqctl stop, then SIGKILL by pid)
#   scripts/rabbitmq-cluster.sh kill NODE     SIGKILL one node by its pid (NODE: 1, 2, 3, c1 or its full name)
#   scripts/rabbitmq-cluster.sh stop NODE     stop one node cleanly
#   scripts/rabbitmq-cluster.sh start NODE    start one node again (it rejoins the cluster by itself)
#   scripts/rabbitmq-cluster.sh status        each node's pid and ports, and the cluster's members
#   scripts/rabbitmq-cluster.sh url [VHOST]   the STEPLINE_AMQP_URL naming the three nodes
#   scripts/rabbitmq-cluster.sh ctl NODE ARGS rabbitmqctl ARGS on one node (add_vhost, list_queues ...)
#
# Idempotent: `up` on a running cluster only checks it. Every node has its own
# name (stepline-c1@localhost ...), AMQP port (5681-5683), distribution port
# (25681-25683) and folder under RABBIT_CLUSTER_DIR; it runs as the `rabbitmq`
# user with that user's Erlang cookie, registers with the machine's epmd and
# binds 127.0.0.1 only. Nothing here touches another node (the shared
# rabbit@localhost on 5672 included): processes are stopped by the pids their
# own pid files hold. Nothing is installed: a missing tool is an error.
#
# Environment:
#   RABBIT_CLUSTER_DIR       data, logs and pid files (default: /tmp/stepline-rabbit-cluster)
#   RABBIT_CLUSTER_PREFIX    node name prefix (default: stepline-c, giving stepline-c1@localhost ...)
#   RABBIT_CLUSTER_AMQP_BASE AMQP port of node N is BASE+N (default: 5680)
#   RABBIT_CLUSTER_DIST_BASE distribution port of node N is BASE+N (default: 25680)
#   RABBIT_CLUSTER_TIMEOUT   seconds to wait for a node to start or stop (default: 120)
#   RABBIT_CLUSTER_USER      the user the nodes run as (default: rabbitmq)
set -euo pipefail

DIR="${RABBIT_CLUSTER_DIR:-/tmp/stepline-rabbit-cluster}"
PREFIX="${RABBIT_CLUSTER_PREFIX:-stepline-c}"
AMQP_BASE="${RABBIT_CLUSTER_AMQP_BASE:-5680}"
DIST_BASE="${RABBIT_CLUSTER_DIST_BASE:-25680}"
TIMEOUT="${RABBIT_CLUSTER_TIMEOUT:-120}"
RUN_AS="${RABBIT_CLUSTER_USER:-rabbitmq}"
NODES=(1 2 3)

say() { printf 'rabbitmq-cluster: %s\n' "$*"; }
die() { printf 'rabbitmq-cluster: ERROR: %s\n' "$*" >&2; exit 1; }

# The RabbitMQ scripts themselves: Debian's live in /usr/lib/rabbitmq/bin (the /usr/sbin ones
# are wrappers that drop our environment); a generic install has them on PATH.
rabbit_bin() {
    if [[ -x "/usr/lib/rabbitmq/bin/$1" ]]; then
        printf '%s' "/usr/lib/rabbitmq/bin/$1"
    elif command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    else
        die "'$1' not found: install RabbitMQ (Debian: apt-get install rabbitmq-server) and run this again"
    fi
}

check_tools() {
    command -v erl >/dev/null 2>&1 || die "'erl' not found: RabbitMQ needs Erlang (Debian: apt-get install erlang-base)"
    SERVER="$(rabbit_bin rabbitmq-server)"
    CTL="$(rabbit_bin rabbitmqctl)"
    id -u "$RUN_AS" >/dev/null 2>&1 ||
        die "user '$RUN_AS' does not exist (set RABBIT_CLUSTER_USER to the user RabbitMQ runs as)"
    USER_HOME="$(getent passwd "$RUN_AS" | cut -d: -f6)"
    [[ -f "$USER_HOME/.erlang.cookie" ]] ||
        die "no Erlang cookie at $USER_HOME/.erlang.cookie (start RabbitMQ once as '$RUN_AS' to make one)"
    if [[ "$(id -u)" != "$(id -u "$RUN_AS")" && "$(id -u)" != 0 ]]; then
        die "run this as root or as '$RUN_AS' (the nodes share that user's Erlang cookie)"
    fi
    if [[ "$(id -u)" == 0 ]]; then
        command -v runuser >/dev/null 2>&1 || die "'runuser' not found (util-linux): needed to run nodes as '$RUN_AS'"
    fi
}

# node_index NODE: 1, 2 or 3 from "2", "c2" or "stepline-c2@localhost".
node_index() {
    local arg="${1:-}" n
    n="${arg##*c}"
    n="${n%%@*}"
    [[ "$n" =~ ^[123]$ ]] || die "unknown node '${arg}': use 1, 2, 3, c1..c3 or ${PREFIX}1@localhost"
    printf '%s' "$n"
}

name_of() { printf '%s%s@localhost' "$PREFIX" "$1"; }
home_of() { printf '%s/c%s' "$DIR" "$1"; }
pidfile_of() { printf '%s/c%s/rabbit.pid' "$DIR" "$1"; }

# as_rabbit CMD...: run as the RabbitMQ user with the environment of node $NODE (set by the caller).
as_rabbit() {
    local n=$NODE home
    home="$(home_of "$n")"
    local -a env=(
        HOME="$USER_HOME"
        PATH="$PATH"
        RABBITMQ_NODENAME="$(name_of "$n")"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        RABBITMQ_NODE_PORT="$((AMQP_BASE + n))"
        RABBITMQ_DIST_PORT="$((DIST_BASE + n))"
        RABBITMQ_CONFIG_FILE="$home/rabbitmq.conf"
        RABBITMQ_CONF_ENV_FILE="$home/rabbitmq-env.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$home/enabled_plugins"
        RABBITMQ_MNESIA_BASE="$home/mnesia"
        RABBITMQ_MNESIA_DIR="$home/mnesia/$(name_of "$n")"
        RABBITMQ_LOG_BASE="$home/log"
        RABBITMQ_PID_FILE="$(pidfile_of "$n")"
        # rabbitmqctl is a short-lived Erlang node that listens on a port of this range: our
        # own, away from the range every other CLI on the machine shares (35672-35682).
        RABBITMQ_CTL_DIST_PORT_MIN="$((DIST_BASE + 20001))"
        RABBITMQ_CTL_DIST_PORT_MAX="$((DIST_BASE + 20020))"
        ERL_EPMD_ADDRESS=127.0.0.1
        ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
    )
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u "$RUN_AS" -- env -i "${env[@]}" "$@"
    else
        env -i "${env[@]}" "$@"
    fi
}

ctl() { as_rabbit "$CTL" -n "$(name_of "$NODE")" "$@"; }

# pid_of N: the pid of node N, from its pid file, or else from the process that listens on its
# distribution port (a node still booting, or one whose pid file was lost): that port is ours.
pid_of() {
    local file pid=""
    file="$(pidfile_of "$1")"
    if [[ -s "$file" ]]; then
        pid="$(tr -dc '0-9' <"$file")"
    fi
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null; then
        pid=""
        if command -v ss >/dev/null 2>&1; then
            pid="$(ss -Hltnp "sport = :$((DIST_BASE + $1))" 2>/dev/null | grep -o 'beam[^,]*,pid=[0-9]*' | head -n 1 | grep -o '[0-9]*$' || true)"
        fi
    fi
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && printf '%s' "$pid"
}

is_running() { pid_of "$1" >/dev/null; }

prepare_home() {
    local n=$1 home
    home="$(home_of "$n")"
    mkdir -p "$home/mnesia" "$home/log"
    cat >"$home/rabbitmq.conf" <<EOF
# Written by scripts/rabbitmq-cluster.sh: node $(name_of "$n") of the Stepline test cluster.
listeners.tcp.local = 127.0.0.1:$((AMQP_BASE + n))
loopback_users.guest = true
# A SIGKILLed peer must count as down quickly (the default tick is 60 s).
net_ticktime = 10
# A fresh node joins the first of these it reaches (classic peer discovery); a node whose
# database already holds the cluster ignores them and rejoins its peers.
cluster_formation.peer_discovery_backend = classic_config
$(for m in "${NODES[@]}"; do printf 'cluster_formation.classic_config.nodes.%s = %s\n' "$m" "$(name_of "$m")"; done)
log.console = false
log.file.level = info
EOF
    : >"$home/rabbitmq-env.conf"
    printf '[].\n' >"$home/enabled_plugins"
    if [[ "$(id -u)" == 0 ]]; then
        chown -R "$RUN_AS:" "$home"
        chown "$RUN_AS:" "$DIR"
    fi
}

start_node() {
    local n=$1
    if is_running "$n"; then
        return 0
    fi
    prepare_home "$n"
    rm -f "$(pidfile_of "$n")"
    say "starting $(name_of "$n") (AMQP 127.0.0.1:$((AMQP_BASE + n)), distribution $((DIST_BASE + n)))"
    # setsid: the node outlives this script and holds none of the caller's pipes.
    # In its own folder: a node that fails to boot writes erl_crash.dump where it runs.
    # Every fd of the background job goes to the log: a caller reading our output must see its end.
    (cd "$(home_of "$n")" && NODE=$n as_rabbit setsid "$SERVER") </dev/null >"$(home_of "$n")/log/startup.log" 2>&1 &
    disown || true
}

# A node opens its AMQP port at the end of its boot: that is the sign it is up (and
# cheaper than a CLI call, which starts a VM of its own).
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_running() {
    local n=$1 deadline=$((SECONDS + TIMEOUT))
    until is_running "$n" && port_open "$((AMQP_BASE + n))"; do
        if ((SECONDS >= deadline)); then
            tail -n 20 "$(home_of "$n")/log/startup.log" >&2 || true
            die "$(name_of "$n") did not start within ${TIMEOUT}s (logs: $(home_of "$n")/log)"
        fi
        sleep 1
    done
}

members_of() { NODE=$1 ctl cluster_status --formatter json 2>/dev/null | python3 -c '
import json, sys
print(" ".join(sorted(json.load(sys.stdin).get("running_nodes", []))))' 2>/dev/null || true; }

# join_cluster N: the fallback when a fresh node came up alone (it missed node 1 at boot).
join_cluster() {
    local n=$1 log
    log="$(home_of "$n")/log/join.log"
    say "joining $(name_of "$n") to $(name_of 1)"
    {
        NODE=$n ctl stop_app && NODE=$n ctl reset && NODE=$n ctl join_cluster "$(name_of 1)" &&
            NODE=$n ctl start_app
    } >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "$(name_of "$n") could not join $(name_of 1) (log: $log)"; }
}

cmd_up() {
    mkdir -p "$DIR"
    local n want running
    want="$(for n in "${NODES[@]}"; do name_of "$n"; echo; done | sort | xargs)"
    # Node 1 first: the fresh nodes after it find it by classic peer discovery and join it.
    # A node that has been clustered before rejoins its peers whatever the order.
    start_node 1
    if [[ ! -d "$(home_of 2)/mnesia/$(name_of 2)" ]]; then wait_running 1; fi
    for n in "${NODES[@]:1}"; do start_node "$n"; done
    for n in "${NODES[@]}"; do wait_running "$n"; done
    running="$(members_of 1)"
    if [[ "$running" != "$want" ]]; then
        for n in "${NODES[@]}"; do
            [[ "$n" == 1 || " $running " == *" $(name_of "$n") "* ]] || join_cluster "$n"
        done
        running="$(members_of 1)"
    fi
    [[ "$running" == "$want" ]] || die "the cluster did not form: running nodes seen from $(name_of 1): ${running:-none}"
    say "cluster up: $want"
}

stop_node() {
    local n=$1 pid
    pid="$(pid_of "$n")" || { say "$(name_of "$n") is not running"; return 0; }
    say "stopping $(name_of "$n") (pid $pid)"
    NODE=$n ctl stop --timeout "$TIMEOUT" >/dev/null 2>&1 || true
    local deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "$(name_of "$n") did not stop within ${TIMEOUT}s: SIGKILL pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.5
    done
    rm -f "$(pidfile_of "$n")"
}

kill_node() {
    local n=$1 pid
    pid="$(pid_of "$n")" || { say "$(name_of "$n") is not running"; return 0; }
    say "SIGKILL $(name_of "$n") (pid $pid)"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

cmd_down() {
    local n
    for n in "${NODES[@]}"; do stop_node "$n" & done
    wait
}

cmd_status() {
    local n pid any=0
    for n in "${NODES[@]}"; do
        if pid="$(pid_of "$n")"; then
            any=1
            say "$(name_of "$n") running, pid $pid, AMQP 127.0.0.1:$((AMQP_BASE + n)), distribution $((DIST_BASE + n))"
        else
            say "$(name_of "$n") down"
        fi
    done
    for n in "${NODES[@]}"; do
        if is_running "$n"; then
            say "cluster members running (seen from $(name_of "$n")): $(members_of "$n")"
            break
        fi
    done
    ((any)) || return 3
}

cmd_url() {
    local vhost="${1:-}" hosts="" n
    for n in "${NODES[@]}"; do hosts+="${hosts:+,}127.0.0.1:$((AMQP_BASE + n))"; done
    printf 'amqp://guest:guest@%s/%s\n' "$hosts" "$vhost"
}

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

action="${1:-}"
case "$action" in
up) check_tools; cmd_up ;;
down) check_tools; cmd_down ;;
kill) check_tools; kill_node "$(node_index "${2:-}")" ;;
stop) check_tools; stop_node "$(node_index "${2:-}")" ;;
start)
    check_tools
    n="$(node_index "${2:-}")"
    start_node "$n"
    wait_running "$n"
    say "$(name_of "$n") running"
    ;;
status) check_tools; cmd_status ;;
url) cmd_url "${2:-}" ;;
ctl)
    check_tools
    NODE="$(node_index "${2:-}")"
    shift 2
    ctl "$@"
    ;;
*) usage ;;
esac
