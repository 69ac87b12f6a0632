#!/usr/bin/env bash
# Soak test: rlsgate's memory and latency over time with many idle clients and a steady load.
#
# Usage: scripts/soak.sh
#
# Environment:
#   SOAK_MINUTES=n            length of the load phase (default 10)
#   SOAK_IDLE=n               idle clients held open the whole time (default 1000)
#   SOAK_RATE=n               pgbench -R transactions per second (default 200)
#   SOAK_CLIENTS=n            pgbench -c (default 8; -j 2)
#   SOAK_POOL=n               rlsgate upstream pool_size (default 10)
#   SOAK_RSS_LIMIT_KB=n       fail when RSS grows more than this over the second half of the
#                             run (default 16384)
#   RLSGATE_SOAK_PGPORT=port  use the PostgreSQL on 127.0.0.1:port instead of a throwaway
#                             cluster; superuser from RLSGATE_SOAK_PGUSER (default postgres,
#                             password from PGPASSWORD if needed). A database soak_<pid> is
#                             created and dropped; rlsgate_app gets a password.
#   RLSGATE_BIN=path          rlsgate binary (default: cargo build --release)
#   PG_BIN=dir                PostgreSQL 15 binaries (default /usr/lib/postgresql/15/bin)
#   SOAK_CSV=path             where the samples go (default /tmp/rlsgate-soak-<date>.csv)
#   KEEP_TMP=1                keep the temporary directory (logs, configs)
#
# Setup follows scripts/bench.sh: a throwaway cluster (as the `postgres` user when root),
# sql/demo.sql loaded into a fresh database, rlsgate started with an HS256 secret from
# RLSGATE_JWT_SECRET and a token minted by `rlsgate token`. The idle clients come from
# examples/idle_clients.rs (they log in and then do nothing). pgbench runs a small
# read transaction for tenant `north` at a fixed rate through the proxy.
#
# Every 10 s a line goes to a CSV (SOAK_CSV, default /tmp/rlsgate-soak-<date>.csv):
#   elapsed_s,rss_kb,tps,lat_avg_ms,lat_stddev_ms,lag_ms,failed
# The summary prints RSS start/end/max, drift over the whole run and over the second half,
# pgbench latency p50/p99 (from the per-transaction log) and the idle clients' fate.
# Exit status: 0 ok; 1 RSS grew more than SOAK_RSS_LIMIT_KB over the second half, pgbench
# failed, or idle clients were dropped; 2 usage/setup error.

set -euo pipefail

MINUTES=${SOAK_MINUTES:-10}
IDLE=${SOAK_IDLE:-1000}
RATE=${SOAK_RATE:-200}
CLIENTS=${SOAK_CLIENTS:-8}
POOL=${SOAK_POOL:-10}
RSS_LIMIT_KB=${SOAK_RSS_LIMIT_KB:-16384}
KEEP_TMP=${KEEP_TMP:-0}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APP_USER=rlsgate_app
APP_PASSWORD="soak-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
SAMPLE_S=10
OUT_CSV=${SOAK_CSV:-${TMPDIR:-/tmp}/rlsgate-soak-$(date +%Y%m%d-%H%M%S).csv}

log() { printf '[soak %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'soak.sh: error: %s\n' "$*" >&2; exit 2; }

for v in MINUTES IDLE RATE CLIENTS POOL RSS_LIMIT_KB; do
    [[ ${!v} =~ ^[0-9]+$ ]] && [ "${!v}" -gt 0 ] || die "$v must be a positive integer (got '${!v}')"
done

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1
as_pg() {
    if [ "$IS_ROOT" -eq 1 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# ---------------------------------------------------------------------------
# Cleanup (registered before anything starts).
# ---------------------------------------------------------------------------
TMP=""
RLSGATE_PID=""
IDLE_PID=""
PGBENCH_PID=""
PG_STARTED=0
EXTERNAL_DB=""

stop_pid() { # pid
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    stop_pid "$PGBENCH_PID"
    stop_pid "$IDLE_PID"
    stop_pid "$RLSGATE_PID"
    if [ -n "$EXTERNAL_DB" ]; then
        psql_super -d postgres -c "DROP DATABASE IF EXISTS $EXTERNAL_DB WITH (FORCE)" >/dev/null 2>&1
    fi
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m fast -w stop >/dev/null 2>&1 \
            || as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$KEEP_TMP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for b in initdb pg_ctl psql pgbench; do
    [ -x "$PG_BIN/$b" ] || die "$PG_BIN/$b not found (install postgresql-15 or set PG_BIN)"
done

# ---------------------------------------------------------------------------
# Binaries.
# ---------------------------------------------------------------------------
if [ -n "${RLSGATE_BIN:-}" ]; then
    [ -x "$RLSGATE_BIN" ] || die "RLSGATE_BIN=$RLSGATE_BIN is not executable"
    log "building the idle-client helper (cargo build --release --example idle_clients)"
    (cd "$ROOT" && cargo build --release --example idle_clients >&2) || die "cargo build failed"
else
    log "building rlsgate and the idle-client helper (cargo build --release)"
    (cd "$ROOT" && cargo build --release --bin rlsgate --example idle_clients >&2) \
        || die "cargo build failed"
    RLSGATE_BIN=$ROOT/target/release/rlsgate
fi
IDLE_BIN=$ROOT/target/release/examples/idle_clients
[ -x "$IDLE_BIN" ] || die "$IDLE_BIN missing after the build"

# ---------------------------------------------------------------------------
# Scratch space, ports.
# ---------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rlsgate-soak.XXXXXX")
chmod 755 "$TMP"
if [ "$IS_ROOT" -eq 1 ]; then chown postgres: "$TMP"; fi
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}
export PGSSLMODE=disable PGGSSENCMODE=disable
unset PGHOST PGPORT PGUSER PGDATABASE PGSERVICE PGOPTIONS 2>/dev/null || true

# ---------------------------------------------------------------------------
# PostgreSQL: a throwaway cluster, or the one on RLSGATE_SOAK_PGPORT.
# ---------------------------------------------------------------------------
if [ -n "${RLSGATE_SOAK_PGPORT:-}" ]; then
    PG_PORT=$RLSGATE_SOAK_PGPORT
    SUPER=${RLSGATE_SOAK_PGUSER:-postgres}
    psql_super() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U "$SUPER" "$@"; }
    DB="soak_$$"
    log "using PostgreSQL on 127.0.0.1:$PG_PORT (database $DB)"
    psql_super -d postgres -c "CREATE DATABASE $DB" >&2
    EXTERNAL_DB=$DB
else
    PG_PORT=$(free_port)
    DB=soak
    log "initdb in $TMP/data (port $PG_PORT)"
    as_pg "$PG_BIN/initdb" -D "$TMP/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
        --no-sync >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
    PG_OPTS="-p $PG_PORT -k $TMP -c listen_addresses=127.0.0.1 -c max_connections=100"
    PG_OPTS="$PG_OPTS -c password_encryption=scram-sha-256 -c synchronous_commit=off"
    PG_STARTED=1
    as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -o "$PG_OPTS" -l "$TMP/postgres.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$TMP/postgres.log" >&2; die "PostgreSQL did not start"; }
    psql_super() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres "$@"; }
    psql_super -d postgres -c "CREATE DATABASE $DB" >&2
fi
psql_super -d "$DB" -f "$ROOT/sql/demo.sql" >"$TMP/demo-load.log" 2>&1 \
    || { cat "$TMP/demo-load.log" >&2; die "loading sql/demo.sql failed"; }
psql_super -d "$DB" -c "ALTER ROLE $APP_USER PASSWORD '$APP_PASSWORD'" >&2

# ---------------------------------------------------------------------------
# rlsgate.
# ---------------------------------------------------------------------------
RLSGATE_PORT=$(free_port)
RLSGATE_JWT_SECRET="soak-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export RLSGATE_JWT_SECRET
cat >"$TMP/rlsgate.toml" <<EOF
[server]
listen = "127.0.0.1:$RLSGATE_PORT"
pool_mode = "transaction"
max_client_conn = $((IDLE + CLIENTS + 50))

[upstream]
host = "127.0.0.1"
port = $PG_PORT
database = "$DB"
user = "$APP_USER"
password = "$APP_PASSWORD"
sslmode = "disable"
pool_size = $POOL

[auth]
algorithms = ["HS256"]
hs_secret = "\${RLSGATE_JWT_SECRET}"
tenant_claim = "store_id"

[context]
"app.current_store_id" = "store_id"
EOF
ttl_h=$(( MINUTES / 60 + 2 ))
TOKEN=$("$RLSGATE_BIN" token --secret-env RLSGATE_JWT_SECRET --claim store_id=north \
    --claim sub=soak --ttl "${ttl_h}h" | tr -d '[:space:]')
[[ $TOKEN =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]] || die "rlsgate token printed no JWT"

log "starting rlsgate on 127.0.0.1:$RLSGATE_PORT (pool $POOL)"
"$RLSGATE_BIN" serve --config "$TMP/rlsgate.toml" >"$TMP/rlsgate.log" 2>&1 &
RLSGATE_PID=$!
for _ in $(seq 150); do
    kill -0 "$RLSGATE_PID" 2>/dev/null || { tail -n 30 "$TMP/rlsgate.log" >&2; die "rlsgate exited"; }
    got=$(PGPASSWORD=$TOKEN "$PG_BIN/psql" -X -At -h 127.0.0.1 -p "$RLSGATE_PORT" -U soak -d "$DB" \
        -c "SELECT count(*) FROM customers" 2>/dev/null || true)
    [ "$got" = 3 ] && break
    sleep 0.2
done
[ "${got:-}" = 3 ] || { tail -n 30 "$TMP/rlsgate.log" >&2; die "rlsgate does not serve (tenant north should see 3 customers, got '${got:-}')"; }

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$RLSGATE_PID/status" 2>/dev/null || echo 0; }

# ---------------------------------------------------------------------------
# Idle clients.
# ---------------------------------------------------------------------------
RSS_BOOT=$(rss_kb)
log "opening $IDLE idle clients"
IDLE_TOKEN=$TOKEN "$IDLE_BIN" "127.0.0.1:$RLSGATE_PORT" "$DB" "$IDLE" >"$TMP/idle.out" 2>"$TMP/idle.err" &
IDLE_PID=$!
for _ in $(seq 600); do
    grep -q '^connected ' "$TMP/idle.out" 2>/dev/null && break
    kill -0 "$IDLE_PID" 2>/dev/null || { cat "$TMP/idle.err" >&2; die "idle_clients exited"; }
    sleep 0.1
done
IDLE_CONNECTED=$(sed -n 's/^connected \([0-9]*\)$/\1/p' "$TMP/idle.out" | head -n 1)
[ "${IDLE_CONNECTED:-0}" -eq "$IDLE" ] \
    || { cat "$TMP/idle.err" >&2; die "only ${IDLE_CONNECTED:-0} of $IDLE idle clients logged in"; }
RSS_IDLE=$(rss_kb)
log "idle clients connected; rlsgate RSS ${RSS_BOOT} kB at boot, ${RSS_IDLE} kB with $IDLE idle clients"

# ---------------------------------------------------------------------------
# Load: pgbench at a fixed rate, sampled every 10 s.
# ---------------------------------------------------------------------------
cat >"$TMP/soak.sql" <<'EOF'
\set c random(1, 3)
BEGIN;
SELECT name, email FROM customers WHERE customer_id = :c;
SELECT count(*) FROM products;
END;
EOF
DURATION=$((MINUTES * 60))
log "pgbench -R $RATE -c $CLIENTS for ${MINUTES} min"
PGPASSWORD=$TOKEN "$PG_BIN/pgbench" -n -M extended -f "$TMP/soak.sql" -R "$RATE" -c "$CLIENTS" -j 2 \
    -T "$DURATION" -P "$SAMPLE_S" -l --log-prefix="$TMP/txlog" \
    -h 127.0.0.1 -p "$RLSGATE_PORT" -U soak "$DB" >"$TMP/pgbench.out" 2>"$TMP/pgbench.err" &
PGBENCH_PID=$!

CSV=$TMP/soak.csv
echo "elapsed_s,rss_kb,tps,lat_avg_ms,lat_stddev_ms,lag_ms,failed" >"$CSV"
echo "0,$RSS_IDLE,,,,," >>"$CSV"
START=$(date +%s)
next=$SAMPLE_S
while kill -0 "$PGBENCH_PID" 2>/dev/null; do
    now=$(( $(date +%s) - START ))
    if [ "$now" -lt "$next" ]; then sleep 1; continue; fi
    rss=$(rss_kb)
    # progress: 10.0 s, 200.1 tps, lat 1.234 ms stddev 0.456, 0 failed, lag 0.123 ms
    prog=$(grep '^progress:' "$TMP/pgbench.err" 2>/dev/null | tail -n 1 || true)
    tps=$(sed -n 's/.*s, \([0-9.]*\) tps.*/\1/p' <<<"$prog")
    lat=$(sed -n 's/.* lat \([0-9.]*\) ms.*/\1/p' <<<"$prog")
    sd=$(sed -n 's/.* stddev \([0-9.]*\).*/\1/p' <<<"$prog")
    lag=$(sed -n 's/.* lag \([0-9.]*\) ms.*/\1/p' <<<"$prog")
    failed=$(sed -n 's/.*, \([0-9]*\) failed.*/\1/p' <<<"$prog")
    echo "$next,$rss,$tps,$lat,$sd,$lag,$failed" >>"$CSV"
    log "t=${next}s rss=${rss}kB tps=${tps:-?} lat=${lat:-?}ms"
    next=$((next + SAMPLE_S))
done
PGBENCH_RC=0
wait "$PGBENCH_PID" || PGBENCH_RC=$?
PGBENCH_PID=""
RSS_END=$(rss_kb)
echo "$(( $(date +%s) - START )),$RSS_END,,,,," >>"$CSV"

# ---------------------------------------------------------------------------
# Summary.
# ---------------------------------------------------------------------------
FAIL=0
read -r RSS_START RSS_MAX RSS_MID <<<"$(awk -F, -v half=$((DURATION / 2)) '
    NR == 2 { start = $2 }
    NR > 1 && $2 > max { max = $2 }
    NR > 1 && mid == "" && $1 >= half { mid = $2 }
    END { print start, max, (mid == "" ? start : mid) }' "$CSV")"
DRIFT=$((RSS_END - RSS_START))
HALF_DRIFT=$((RSS_END - RSS_MID))

cat "$TMP"/txlog.* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n >"$TMP/latencies_us" || true
N_TX=$(wc -l <"$TMP/latencies_us")
pct() { # fraction -> ms
    awk -v n="$N_TX" -v p="$1" 'n > 0 { i = int(n * p); if (i < 1) i = 1; if (NR == i) { printf "%.2f", $1 / 1000; exit } }' \
        "$TMP/latencies_us"
}
P50=$(pct 0.50); P99=$(pct 0.99)
PGB_FAILED=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$TMP/pgbench.out" | tail -n 1)
PGB_TPS=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$TMP/pgbench.out" | tail -n 1)

stop_pid "$IDLE_PID"
IDLE_PID=""
IDLE_SUMMARY=$(grep '^idle_clients:' "$TMP/idle.out" | tail -n 1 || true)
IDLE_CLOSED=$(sed -n 's/.*closed_by_server=\([0-9]*\).*/\1/p' <<<"$IDLE_SUMMARY")

cp "$CSV" "$OUT_CSV" 2>/dev/null || true
echo "soak: ${MINUTES} min, $IDLE idle clients, pgbench -R $RATE -c $CLIENTS, pool $POOL"
echo "soak: rss_kb boot=$RSS_BOOT with_idle=$RSS_IDLE start=$RSS_START end=$RSS_END max=$RSS_MAX drift=$DRIFT second_half_drift=$HALF_DRIFT (limit $RSS_LIMIT_KB)"
echo "soak: pgbench tps=${PGB_TPS:-?} transactions=$N_TX failed=${PGB_FAILED:-?} latency_ms p50=${P50:-?} p99=${P99:-?}"
echo "soak: ${IDLE_SUMMARY:-idle_clients: no summary}"
echo "soak: samples in $OUT_CSV"

if [ "$PGBENCH_RC" -ne 0 ]; then
    echo "soak: FAIL pgbench exited $PGBENCH_RC" >&2
    grep -v '^progress:' "$TMP/pgbench.err" | tail -n 15 >&2
    FAIL=1
fi
if [ "${PGB_FAILED:-0}" != 0 ]; then echo "soak: FAIL $PGB_FAILED pgbench transactions failed" >&2; FAIL=1; fi
if [ "${IDLE_CLOSED:-0}" != 0 ]; then echo "soak: FAIL $IDLE_CLOSED idle clients were disconnected" >&2; FAIL=1; fi
if [ "$HALF_DRIFT" -gt "$RSS_LIMIT_KB" ]; then
    echo "soak: FAIL RSS grew ${HALF_DRIFT} kB over the second half (limit $RSS_LIMIT_KB kB)" >&2
    FAIL=1
fi
if ! kill -0 "$RLSGATE_PID" 2>/dev/null; then echo "soak: FAIL rlsgate died" >&2; FAIL=1; fi
[ "$FAIL" -eq 0 ] && echo "soak: OK"
exit "$FAIL"
