#!/usr/bin/env bash
# Run one compatibility driver script with the interpreter and paths install.sh set up:
#   bash tests/compat/run.sh psycopg3|asyncpg|node-postgres|jdbc
# The script reads PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, TOKEN_NORTH, TOKEN_SOUTH,
# COMPAT_CLIENTS and COMPAT_DIR from the environment and prints one JSON line per feature.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
COMPAT_ENV="${COMPAT_ENV:-$repo/target/compat-env}"
JDBC_JAR="${COMPAT_JDBC_JAR:-/usr/share/java/postgresql.jar}"

need() {
    [ -e "$1" ] || { echo "compat/run: $1 is missing; run tests/compat/install.sh first" >&2; exit 2; }
}

case "${1:-}" in
    psycopg3|psycopg)
        need "$COMPAT_ENV/venv/bin/python"
        exec "$COMPAT_ENV/venv/bin/python" "$here/psycopg_check.py"
        ;;
    asyncpg)
        need "$COMPAT_ENV/venv/bin/python"
        exec "$COMPAT_ENV/venv/bin/python" "$here/asyncpg_check.py"
        ;;
    node-postgres|node-pg|pg)
        need "$COMPAT_ENV/node/node_modules/pg"
        NODE_PATH="$COMPAT_ENV/node/node_modules${NODE_PATH:+:$NODE_PATH}" exec node "$here/node_pg_check.js"
        ;;
    jdbc)
        need "$JDBC_JAR"
        # The single-file source launcher compiles into memory; keep the JIT light so the JVM
        # starts fast on a busy 2-core machine.
        exec java -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Xshare:auto \
            -cp "$JDBC_JAR" "$here/JdbcCheck.java"
        ;;
    *)
        echo "usage: $0 psycopg3|asyncpg|node-postgres|jdbc" >&2
        exit 2
        ;;
esac
