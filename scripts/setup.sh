#!/usr/bin/env bash
# Install what a fresh machine lacks to build and test rlsgate (idempotent, quick when done):
#   - libclang-dev + clang: pg_query (the real Postgres parser) generates its bindings with bindgen
#   - PostgreSQL 15 server binaries: `rlsgate demo` and the tests start a throwaway cluster
set -euo pipefail

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev clang)
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
[ -x "$PG_BIN/initdb" ] || missing+=(postgresql-15 postgresql-client-15)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
