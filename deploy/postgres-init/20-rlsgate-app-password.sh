#!/bin/sh
# Runs once, after 10-demo.sql, when the postgres container initialises an
# empty data directory (/docker-entrypoint-initdb.d). sql/demo.sql creates the
# role rlsgate_app without a password; give it the one rlsgate logs in with.
# The password is passed as a psql variable, so it is quoted by psql and never
# pasted into SQL text.
set -e

if [ -z "${RLSGATE_UPSTREAM_PASSWORD:-}" ]; then
    echo "RLSGATE_UPSTREAM_PASSWORD is not set; rlsgate_app gets no password" >&2
    exit 1
fi

psql -v ON_ERROR_STOP=1 --no-psqlrc \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v app_password="$RLSGATE_UPSTREAM_PASSWORD" <<'SQL'
ALTER ROLE rlsgate_app PASSWORD :'app_password';
SQL
