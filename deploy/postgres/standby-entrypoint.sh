#!/usr/bin/env bash
# The production profile's standby: clone postgres-primary once (pg_basebackup), then stream
# from it under the application_name its synchronous_standby_names waits for. Promote it with
#   docker compose exec -u postgres postgres-standby pg_ctl promote -D /var/lib/postgresql/data
set -euo pipefail

PGDATA="${PGDATA:-/var/lib/postgresql/data}"
if [[ "$(id -u)" == 0 ]]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 700 "$PGDATA"
    exec gosu postgres "$0" "$@"
fi

if [[ ! -s "$PGDATA/PG_VERSION" ]]; then
    for attempt in $(seq 1 30); do
        if pg_basebackup --pgdata="$PGDATA" --host="$PRIMARY_HOST" --username=replicator \
            --wal-method=stream --slot=standby --write-recovery-conf; then
            break
        fi
        [[ "$attempt" == 30 ]] && { echo "standby: cannot clone $PRIMARY_HOST" >&2; exit 1; }
        rm -rf "${PGDATA:?}"/*
        sleep 2
    done
    # Later lines win: the same connection, named as the primary's synchronous_standby_names says.
    echo "primary_conninfo = 'host=$PRIMARY_HOST port=5432 user=replicator password=$PGPASSWORD application_name=standby'" \
        >>"$PGDATA/postgresql.auto.conf"
fi
exec postgres
