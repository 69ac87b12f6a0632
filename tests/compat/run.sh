#!/usr/bin/env bash
# Run one compatibility driver script with the interpreter and paths install.sh set up:
#   bash tests/compat/run.sh psycopg3|asyncpg|node-postgres|jdbc|sqlalchemy-psycopg|sqlalchemy-asyncpg
#                            |django|activerecord|libpq18-protocol-3.2|libpq18-direct-tls
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
    sqlalchemy-psycopg|sqlalchemy-asyncpg)
        need "$COMPAT_ENV/venv/bin/python"
        exec "$COMPAT_ENV/venv/bin/python" "$here/sqlalchemy_check.py" "${1#sqlalchemy-}"
        ;;
    django)
        need "$COMPAT_ENV/venv/bin/python"
        exec "$COMPAT_ENV/venv/bin/python" "$here/django_check.py"
        ;;
    libpq18-protocol-3.2|libpq18-direct-tls)
        need "$COMPAT_ENV/venv/bin/python"
        exec "$COMPAT_ENV/venv/bin/python" "$here/libpq18_check.py" "${1#libpq18-}"
        ;;
    activerecord)
        command -v ruby >/dev/null 2>&1 || { echo "compat/run: ruby is missing; run tests/compat/install.sh first" >&2; exit 2; }
        exec ruby "$here/activerecord_check.rb"
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
        echo "usage: $0 psycopg3|asyncpg|node-postgres|jdbc|sqlalchemy-psycopg|sqlalchemy-asyncpg|django|activerecord|libpq18-protocol-3.2|libpq18-direct-tls" >&2
        exit 2
        ;;
esac
