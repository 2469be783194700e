#!/usr/bin/env bash
# First start of the production profile's primary (docker-entrypoint-initdb.d): a replication
# role and slot for postgres-standby, and synchronous replication to it, as
# scripts/postgres-standby.sh sets up on one machine.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE replicator WITH REPLICATION LOGIN PASSWORD :'password';
SELECT pg_create_physical_replication_slot('standby');
-- ALTER SYSTEM, not a -c flag: the entrypoint's initialisation server must not wait for a
-- standby that does not exist yet. From the real start on, a commit returns only once the
-- standby has it on disk, so promoting it loses no acknowledged commit.
ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 (standby)';
SQL

echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
