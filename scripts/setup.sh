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

# Citus for tests/citus.rs, when the build beside the project (../shared/citus) is present: it
# loads only into the PostgreSQL 15 minor it was built for or a later one (15.18 lacks symbols
# that 15.20 headers use), then install.sh copies it in (idempotent).
CITUS_TARBALL="$(dirname "$0")/../../shared/citus/citus-pg15.tar.gz"
if [ -f "$CITUS_TARBALL" ]; then
    built=$(tar -xzOf "$CITUS_TARBALL" citus-pg15/MANIFEST.txt | sed -n 's/.*built for PostgreSQL 15\.\([0-9]*\).*/\1/p' | head -1)
    have=$("$PG_BIN/postgres" --version | sed -n 's/.* 15\.\([0-9]*\).*/\1/p')
    if [ -n "$built" ] && [ -n "$have" ] && [ "$have" -lt "$built" ]; then
        echo "setup: upgrading postgresql-15 (15.$have) for Citus (built for 15.$built)" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --only-upgrade \
            postgresql-15 postgresql-client-15 >/dev/null
    fi
    as_root bash "$(dirname "$CITUS_TARBALL")/install.sh" "$CITUS_TARBALL" >/dev/null
fi
