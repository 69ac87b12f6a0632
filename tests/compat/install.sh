#!/usr/bin/env bash
# Install the client drivers the compatibility suite (tests/compat.rs) runs against rlsgate.
# Idempotent and quick when everything is already there. Works as root on a fresh Debian 12
# machine (CPython 3.11 with pip, Node 20 with npm, Java 17); only PyPI, npm and Debian are used.
#
#   ${COMPAT_ENV}/venv   Python venv with psycopg[binary] (psycopg 3, bundling libpq 18), asyncpg,
#                        SQLAlchemy (with greenlet for its asyncio extension) and Django
#   ${COMPAT_ENV}/node   npm prefix with pg (node-postgres)
#   /usr/share/java/postgresql.jar   pgJDBC from Debian (libpostgresql-jdbc-java)
#   ruby with ActiveRecord and pg from Debian (ruby-activerecord, ruby-pg)
#
# COMPAT_ENV defaults to <repo>/target/compat-env. Everything it does is reported on stderr;
# stdout stays empty.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
COMPAT_ENV="${COMPAT_ENV:-$repo/target/compat-env}"
PYTHON="${COMPAT_PYTHON:-python3}"
JDBC_JAR="${COMPAT_JDBC_JAR:-/usr/share/java/postgresql.jar}"

# Exact versions, so that a new driver release cannot change the suite's results unnoticed.
# Bump them here (the next run reinstalls because the recorded requirements differ).
PY_REQS=('psycopg[binary]==3.3.9' 'asyncpg==0.32.0' 'SQLAlchemy==2.0.44' 'greenlet==3.2.4'
    'typing_extensions==4.16.0' 'Django==5.2.19' 'asgiref==3.11.0' 'sqlparse==0.5.3')
NODE_REQ='pg@8.23.1'

log() { echo "compat/install: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq >&2
        apt_updated=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

mkdir -p "$COMPAT_ENV"
# Two runs at once (e.g. two test processes) must not install into the same place together.
exec 9>"$COMPAT_ENV/.install.lock"
flock 9

# --- Python: psycopg 3 + asyncpg in a venv --------------------------------------------------
venv="$COMPAT_ENV/venv"
py_stamp="$venv/.compat-requirements"
if [ "$(cat "$py_stamp" 2>/dev/null)" != "${PY_REQS[*]}" ] \
    || ! "$venv/bin/python" -c 'import psycopg, asyncpg, sqlalchemy, greenlet, django' >/dev/null 2>&1; then
    if [ ! -x "$venv/bin/python" ]; then
        log "creating venv $venv with $("$PYTHON" --version 2>&1)"
        if ! "$PYTHON" -m venv "$venv" >&2; then
            # Debian's python3 needs python3-venv (ensurepip) to create venvs with pip.
            rm -rf "$venv"
            apt_install python3-venv
            "$PYTHON" -m venv "$venv" >&2
        fi
    fi
    log "pip install ${PY_REQS[*]}"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q "${PY_REQS[@]}" >&2
    "$venv/bin/python" -c 'import psycopg, asyncpg, sqlalchemy, greenlet, django' >&2
    echo "${PY_REQS[*]}" >"$py_stamp"
    log "installed $("$venv/bin/python" -c 'import psycopg, asyncpg, sqlalchemy, django; print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), asyncpg {asyncpg.__version__}, SQLAlchemy {sqlalchemy.__version__}, Django {django.__version__}")')"
fi

# --- Node: pg (node-postgres) ---------------------------------------------------------------
node_prefix="$COMPAT_ENV/node"
node_stamp="$node_prefix/.compat-requirements"
if [ "$(cat "$node_stamp" 2>/dev/null)" != "$NODE_REQ" ] || [ ! -f "$node_prefix/node_modules/pg/package.json" ]; then
    command -v npm >/dev/null 2>&1 || { log "npm is missing (Node.js 20 with npm is expected on the machine)"; exit 1; }
    mkdir -p "$node_prefix"
    log "npm install --prefix $node_prefix $NODE_REQ"
    npm install --prefix "$node_prefix" --save-exact --no-audit --no-fund --loglevel=error "$NODE_REQ" >&2
    log "installed pg $(node -p "require('$node_prefix/node_modules/pg/package.json').version")"
    echo "$NODE_REQ" >"$node_stamp"
fi

# --- Debian: a JRE and pgJDBC; Ruby with ActiveRecord and pg ------------------------------
pkgs=()
command -v java >/dev/null 2>&1 || pkgs+=(default-jre-headless)
[ -f "$JDBC_JAR" ] || pkgs+=(libpostgresql-jdbc-java)
# ActiveRecord 6.1 and ruby-pg 1.4 as Debian 12 ships them (the versions are Debian's).
command -v ruby >/dev/null 2>&1 && ruby -e 'require "active_record"; require "pg"' >/dev/null 2>&1 \
    || pkgs+=(ruby ruby-activerecord ruby-pg)
if [ "${#pkgs[@]}" -gt 0 ]; then
    apt_install "${pkgs[@]}"
    [ -f "$JDBC_JAR" ] || { log "$JDBC_JAR still missing after installing ${pkgs[*]}"; exit 1; }
    log "installed ${pkgs[*]}"
fi
