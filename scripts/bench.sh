#!/usr/bin/env bash
# Compare pgbench throughput: direct PostgreSQL vs rlsgate vs PgBouncer.
#
# Usage: scripts/bench.sh [-d SECONDS] [-c CLIENTS] [-j THREADS] [-r ROUNDS]
#
#   -d SECONDS  duration of each pgbench run          (default 10)
#   -c CLIENTS  pgbench clients (-c)                   (default 8)
#   -j THREADS  pgbench threads (-j)                   (default 2)
#   -r ROUNDS   runs per case and target, averaged     (default 2)
#
# Environment:
#   RLSGATE_BIN=path   use this rlsgate binary instead of building one
#                      (default: cargo build --profile dist, target/dist/rlsgate:
#                      the release profile with link-time optimisation, as the
#                      Dockerfile builds it)
#   SKIP_RLSGATE=1     do not build or start rlsgate; measure direct and
#                      PgBouncer only (rlsgate columns print "skipped")
#   BENCH_CASES="..."  subset of: select_simple select_extended
#                      select_prepared tpcb churn idle signed (default: all,
#                      in that order; BENCH_CASES=idle measures memory only)
#   BENCH_IDLE="n ..." idle-client counts of the idle case (default "1000 10000")
#   PG_BIN=dir         PostgreSQL 15 server binaries
#                      (default /usr/lib/postgresql/15/bin)
#   BENCH_SCALE=n      pgbench -i scale factor (default 10)
#   KEEP_TMP=1         keep the temporary directory (logs, configs) at exit
#   BENCH_WRAP=true    run rlsgate with [upstream] transaction_wrap = true
#   BENCH_PIPELINE=n   run rlsgate with [server] pipeline_depth = n (default 1)
#
# Everything runs on 127.0.0.1 in a temporary directory: a throwaway
# PostgreSQL cluster (run as the `postgres` user when this script runs as
# root), PgBouncer (installed with apt-get when missing) and rlsgate. All of
# it is stopped and removed on exit, also after an error or Ctrl-C.
#
# Output: progress on stderr; on stdout exactly one line per case:
#   case=<name> direct_tps=<n> rlsgate_tps=<n> pgbouncer_tps=<n> rlsgate/direct=<r> rlsgate/pgbouncer=<r>
# followed on the same line by <target>_failed=<n> when pgbench counted failed
# transactions for that target, then CPU microseconds per transaction (user +
# system, from /proc): <target>_pg_us (all of Postgres' processes) for each
# target and <target>_proxy_us (the proxy's process) for rlsgate and pgbouncer,
# and <target>_syscalls_per_tx for the proxies: system calls per transaction,
# counted by strace -c attached to the proxy during one extra 3 s run of the
# case whose TPS counts nowhere ("n/a" without strace; the most frequent
# calls are logged on stderr). A target whose pgbench run errored or aborted
# (any round) prints tps "error" and its ratios "n/a"; the pgbench output is
# copied to stderr.
#
# Cases (every run: pgbench -n -T D -c C -j J -h 127.0.0.1 -p PORT -U rlsgate_app bench):
#   select_simple    -S -M simple
#   select_extended  -S -M extended
#   select_prepared  -S -M prepared    (PgBouncer before 1.21 does not support
#                                       protocol-level prepared statements in
#                                       transaction mode: expect "error" there)
#   tpcb             built-in TPC-B-like script, -M simple
#   churn            -S -M simple -C   (a new connection per transaction); also
#                    against a second PgBouncer with auth_type = md5 (the
#                    first, like Postgres, asks for SCRAM, whose key
#                    stretching costs milliseconds per login by design):
#                    pgbouncer_md5_tps=<n> rlsgate/pgbouncer_md5=<r> and its
#                    pgbouncer_md5_pg_us / _proxy_us
#   idle             memory per idle client, for each count n in BENCH_IDLE:
#                    a fresh rlsgate and a fresh PgBouncer (each warmed up
#                    by one query), then examples/idle_clients.rs logs n
#                    clients in (plaintext) and keeps them idle; RSS of the
#                    proxy process before the logins and 3 s after the last
#                    one gives KB per idle client. One line per count:
#   case=idle_<n> rlsgate_kb_per_client=<r> pgbouncer_kb_per_client=<r> rlsgate/pgbouncer=<r> rlsgate_rss_kb=<before>/<after> pgbouncer_rss_kb=<before>/<after>
#                    (PgBouncer lets the idle user in with a cleartext
#                    password via auth_type = hba, as idle_clients speaks no
#                    SCRAM; it connects upstream as rlsgate_app.)
#   hol              head-of-line blocking: for each target, 2 clients run
#                    `SELECT pg_sleep(0.1)` back to back while -S -M extended
#                    runs with the usual clients; per-transaction latency of
#                    the short ones from pgbench -l:
#   case=hol <target>_p50_us=<n> <target>_p99_us=<n> <target>_short_tps=<n> ...
#                    (with BENCH_PIPELINE > 1 rlsgate's short units may queue
#                    behind a sleep on a shared connection)
#   signed           [context] mode = "signed" against plain, rlsgate only, on
#                    an RLS-bound read: a 100 000-row table of 10 tenants,
#                    `SELECT v FROM t WHERE id = :id` (random id) under the
#                    policy `store_id = (SELECT ...)`: plain
#                    nullif(current_setting(...), ''), signed rlsgate.tenant()
#                    (sql/hardened.sql). A second rlsgate serves the signed
#                    runs; -M extended. Two lines:
#   case=signed plain_tps=<n> signed_tps=<n> signed/plain=<r> plain_pg_us=... plain_proxy_us=... signed_pg_us=... signed_proxy_us=...
#                    (one tenant: each server connection is sealed once), and
#   case=signed_2tenants ...  two pgbench processes of two tenants at once
#                    (-c C/2 each): pooled connections change tenant (and are
#                    sealed again) all the time.
#
# rlsgate is started with an HS256 secret from RLSGATE_JWT_SECRET and a token
# minted by `rlsgate token --secret-env RLSGATE_JWT_SECRET --claim
# store_id=bench --ttl <T>` is the password of its runs; every transaction it
# relays gets SET LOCAL app.current_store_id = 'bench'. The pgbench tables
# carry no RLS policies, so the numbers measure the proxy itself.
#
# The server runs with synchronous_commit=off so that write cases measure the
# proxies rather than WAL flushes (the same for every target).

set -euo pipefail

DURATION=10
CLIENTS=8
THREADS=2
ROUNDS=2

usage() {
    if [ "${1:-2}" -eq 0 ]; then
        sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"
        exit 0
    fi
    echo "usage: $0 [-d SECONDS] [-c CLIENTS] [-j THREADS] [-r ROUNDS]   (-h for help)" >&2
    exit "${1:-2}"
}

while getopts ":d:c:j:r:h" opt; do
    case "$opt" in
        d) DURATION=$OPTARG ;;
        c) CLIENTS=$OPTARG ;;
        j) THREADS=$OPTARG ;;
        r) ROUNDS=$OPTARG ;;
        h) usage 0 ;;
        :) echo "bench.sh: option -$OPTARG needs a value" >&2; usage ;;
        *) echo "bench.sh: unknown option -$OPTARG" >&2; usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 0 ] || { echo "bench.sh: unexpected argument: $1" >&2; usage; }

for pair in "-d:$DURATION" "-c:$CLIENTS" "-j:$THREADS" "-r:$ROUNDS"; do
    val=${pair#*:}
    if ! [[ $val =~ ^[1-9][0-9]*$ ]]; then
        echo "bench.sh: ${pair%%:*} needs a positive integer, got '$val'" >&2
        exit 2
    fi
done
if [ "$THREADS" -gt "$CLIENTS" ]; then
    echo "bench.sh: -j $THREADS > -c $CLIENTS, using -j $CLIENTS" >&2
    THREADS=$CLIENTS
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SKIP_RLSGATE=${SKIP_RLSGATE:-0}
KEEP_TMP=${KEEP_TMP:-0}
SCALE=${BENCH_SCALE:-10}
ALL_CASES="select_simple select_extended select_prepared tpcb churn idle signed hol"
CASES=${BENCH_CASES:-$ALL_CASES}
IDLE_COUNTS=${BENCH_IDLE:-1000 10000}
APP_USER=rlsgate_app
APP_PASSWORD=benchpw
DB=bench

for c in $CASES; do
    case " $ALL_CASES " in
        *" $c "*) ;;
        *) echo "bench.sh: unknown case '$c' in BENCH_CASES (known: $ALL_CASES)" >&2; exit 2 ;;
    esac
done
IDLE_MAX=0
case " $CASES " in
    *" idle "*)
        for n in $IDLE_COUNTS; do
            [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench.sh: BENCH_IDLE needs positive integers, got '$n'" >&2; exit 2; }
            if [ "$n" -gt "$IDLE_MAX" ]; then IDLE_MAX=$n; fi
        done
        [ "$IDLE_MAX" -gt 0 ] || { echo "bench.sh: BENCH_IDLE is empty" >&2; exit 2; }
        # One descriptor per idle client in idle_clients and in the proxy (rlsgate raises its own
        # soft limit to the hard one; PgBouncer and idle_clients inherit this shell's).
        ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
        if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((IDLE_MAX + 200)) ]; then
            echo "bench.sh: BENCH_IDLE up to $IDLE_MAX needs an open-files limit of $((IDLE_MAX + 200)), have $(ulimit -n) (hard $(ulimit -Hn))" >&2
            exit 2
        fi
        ;;
esac

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'bench.sh: error: %s\n' "$*" >&2; exit 1; }

IS_ROOT=0
[ "$(id -u)" -eq 0 ] && IS_ROOT=1

as_root() {
    if [ "$IS_ROOT" -eq 1 ]; then "$@"; else sudo "$@"; fi
}

# Run a server-side command (initdb, pg_ctl, pgbouncer) as the unprivileged
# `postgres` user when we are root; PostgreSQL refuses to run as root.
as_pg() {
    if [ "$IS_ROOT" -eq 1 ]; then
        (cd / && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# ---------------------------------------------------------------------------
# Cleanup: registered before anything is started.
# ---------------------------------------------------------------------------
TMP=""
RLSGATE_PID=""
PG_STARTED=0
# The idle case's own processes (idle_clients and a fresh rlsgate), stopped at exit too.
EXTRA_PIDS=""

stop_pid() { # pid: TERM, up to 5 s, then KILL
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local p
    for p in $EXTRA_PIDS $RLSGATE_PID; do stop_pid "$p"; done
    if [ -n "$TMP" ]; then
        local pidfile
        for pidfile in "$TMP"/pgbouncer*.pid; do
            [ -f "$pidfile" ] && stop_pid "$(cat "$pidfile" 2>/dev/null)"
        done
    fi
    if [ "$PG_STARTED" -eq 1 ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m fast -w stop >/dev/null 2>&1 \
            || as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -m immediate -w stop >/dev/null 2>&1
    fi
    if [ -n "$TMP" ] && [ -d "$TMP" ]; then
        if [ "$KEEP_TMP" = 1 ]; then
            log "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Prerequisites.
# ---------------------------------------------------------------------------
for b in initdb pg_ctl psql pgbench pg_isready; do
    [ -x "$PG_BIN/$b" ] || die "$PG_BIN/$b not found (install postgresql-15 or set PG_BIN)"
done
if [ "$IS_ROOT" -eq 1 ]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to run the server as"
    command -v runuser >/dev/null || die "runuser not found"
fi

find_pgbouncer() {
    PGBOUNCER=$(command -v pgbouncer 2>/dev/null || true)
    if [ -z "$PGBOUNCER" ] && [ -x /usr/sbin/pgbouncer ]; then PGBOUNCER=/usr/sbin/pgbouncer; fi
    [ -n "$PGBOUNCER" ]
}
if ! find_pgbouncer; then
    log "installing pgbouncer"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2; then
        as_root apt-get update -q >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer >&2
    fi
    find_pgbouncer || die "pgbouncer still not found after apt-get install"
fi

if [ "$SKIP_RLSGATE" = 1 ]; then
    log "SKIP_RLSGATE=1: rlsgate is not built or measured"
    RLSGATE_BIN=""
elif [ -n "${RLSGATE_BIN:-}" ]; then
    [ -x "$RLSGATE_BIN" ] || die "RLSGATE_BIN=$RLSGATE_BIN is not an executable file"
else
    log "building rlsgate (cargo build --profile dist --bin rlsgate)"
    (cd "$ROOT" && cargo build --profile dist --bin rlsgate >&2) || die "cargo build --profile dist failed"
    RLSGATE_BIN=$ROOT/target/dist/rlsgate
    [ -x "$RLSGATE_BIN" ] || die "build finished but $RLSGATE_BIN does not exist"
fi
IDLE_BIN=""
if [ "$IDLE_MAX" -gt 0 ]; then
    log "building the idle-client helper (cargo build --release --example idle_clients)"
    (cd "$ROOT" && cargo build --release --example idle_clients >&2) || die "cargo build --example idle_clients failed"
    IDLE_BIN=$ROOT/target/release/examples/idle_clients
    [ -x "$IDLE_BIN" ] || die "build finished but $IDLE_BIN does not exist"
fi

# ---------------------------------------------------------------------------
# Scratch space and ports.
# ---------------------------------------------------------------------------
# Short path: the Unix socket path (dir + /.s.PGSQL.NNNNN) must fit 107 bytes.
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rlsgate-bench.XXXXXX")
chmod 755 "$TMP"
if [ "$IS_ROOT" -eq 1 ]; then chown postgres: "$TMP"; fi

USED_PORTS=" "
port_in_use() {
    # A successful connect means someone listens there.
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
# Listen ports come from below the kernel's ephemeral range, so an outgoing
# connection's local port (pgbench's, the proxies') cannot take them.
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[[ $EPHEMERAL_LOW =~ ^[0-9]+$ ]] && [ "$EPHEMERAL_LOW" -gt 12000 ] || EPHEMERAL_LOW=32768
pick_port() { # sets FREE_PORT (not run in a subshell, so USED_PORTS sticks)
    local p
    for _ in $(seq 200); do
        p=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
        case "$USED_PORTS" in *" $p "*) continue ;; esac
        if ! port_in_use "$p"; then
            USED_PORTS="$USED_PORTS$p "
            FREE_PORT=$p
            return 0
        fi
    done
    die "no free TCP port found"
}
pick_port; PG_PORT=$FREE_PORT
pick_port; BOUNCER_PORT=$FREE_PORT
pick_port; RLSGATE_PORT=$FREE_PORT
pick_port; IDLE_PORT=$FREE_PORT

# libpq settings for every client below: plain TCP on loopback, no TLS or GSS
# negotiation round trips (the same for all three targets).
export PGSSLMODE=disable PGGSSENCMODE=disable
unset PGHOST PGPORT PGUSER PGDATABASE PGPASSWORD PGSERVICE PGOPTIONS 2>/dev/null || true

# ---------------------------------------------------------------------------
# PostgreSQL.
# ---------------------------------------------------------------------------
log "initdb in $TMP/data (port $PG_PORT)"
as_pg "$PG_BIN/initdb" -D "$TMP/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --no-sync >"$TMP/initdb.log" 2>&1 || { cat "$TMP/initdb.log" >&2; die "initdb failed"; }

# Local socket: trust (setup as superuser). TCP from 127.0.0.1: SCRAM for
# rlsgate_app (direct runs, PgBouncer and rlsgate upstream connections).
cat >"$TMP/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
if [ "$IS_ROOT" -eq 1 ]; then chown postgres: "$TMP/pg_hba.conf"; fi
cp "$TMP/pg_hba.conf" "$TMP/data/pg_hba.conf"

PG_OPTS="-p $PG_PORT -k $TMP -c listen_addresses=127.0.0.1 -c max_connections=200"
PG_OPTS="$PG_OPTS -c password_encryption=scram-sha-256 -c synchronous_commit=off"
PG_STARTED=1
as_pg "$PG_BIN/pg_ctl" -D "$TMP/data" -o "$PG_OPTS" -l "$TMP/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$TMP/postgres.log" >&2 2>/dev/null; die "PostgreSQL did not start"; }

psql_super() {
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$TMP" -p "$PG_PORT" -U postgres "$@"
}
psql_super -d postgres -c "CREATE DATABASE $DB" >&2
log "pgbench -i -s $SCALE $DB"
"$PG_BIN/pgbench" -i -q -s "$SCALE" -h "$TMP" -p "$PG_PORT" -U postgres "$DB" >"$TMP/pgbench-init.log" 2>&1 \
    || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }
psql_super -d "$DB" >&2 <<EOF
CREATE ROLE $APP_USER LOGIN PASSWORD '$APP_PASSWORD';
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO $APP_USER;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO $APP_USER;
EOF
# rlsgate's pipelined SET LOCAL draws a WARNING per transaction; the recommended deployment keeps
# it out of the server log (README, "Preparing the database"). BENCH_LOG_WARNINGS=1 measures without.
if [ "${BENCH_LOG_WARNINGS:-0}" != 1 ]; then
    psql_super -d "$DB" -c "ALTER ROLE $APP_USER SET log_min_messages = 'error'" >&2
fi

# ---------------------------------------------------------------------------
# PgBouncer (transaction pooling, same pool size as rlsgate).
# ---------------------------------------------------------------------------
cat >"$TMP/userlist.txt" <<EOF
"$APP_USER" "$APP_PASSWORD"
EOF
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $TMP/userlist.txt
pool_mode = transaction
default_pool_size = 20
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1000
max_db_connections = 20
ignore_startup_parameters = extra_float_digits
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
log_connections = 0
log_disconnections = 0
EOF
chmod 600 "$TMP/userlist.txt"
if [ "$IS_ROOT" -eq 1 ]; then chown postgres: "$TMP/userlist.txt" "$TMP/pgbouncer.ini"; fi

log "starting pgbouncer on 127.0.0.1:$BOUNCER_PORT"
as_pg "$PGBOUNCER" -d "$TMP/pgbouncer.ini" >"$TMP/pgbouncer.stdout" 2>&1 \
    || { cat "$TMP/pgbouncer.stdout" "$TMP/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer did not start"; }

wait_ready() { # name port pid-or-empty log
    local name=$1 port=$2 pid=$3 logf=$4
    for _ in $(seq 150); do
        if { [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; } \
            || { [ "$name" = pgbouncer ] && grep -q ' FATAL ' "$logf" 2>/dev/null; }; then
            echo "----- $logf" >&2; tail -n 30 "$logf" >&2 2>/dev/null
            die "$name exited during startup"
        fi
        if "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$port" -d "$DB" -U "$APP_USER" -t 2; then
            return 0
        fi
        sleep 0.2
    done
    echo "----- $logf" >&2; tail -n 30 "$logf" >&2 2>/dev/null
    die "$name is not accepting connections on 127.0.0.1:$port after 30s"
}
wait_ready pgbouncer "$BOUNCER_PORT" "" "$TMP/pgbouncer.log"

# A second PgBouncer for the churn case, identical but for auth_type = md5: the case measures the
# login path, and SCRAM (what Postgres and the first PgBouncer ask for) costs milliseconds of CPU
# per login by design. Started on first use.
MD5_BOUNCER_PORT=""
start_md5_bouncer() {
    [ -z "$MD5_BOUNCER_PORT" ] || return 0
    pick_port; MD5_BOUNCER_PORT=$FREE_PORT
    sed -e "s/^listen_port = .*/listen_port = $MD5_BOUNCER_PORT/" \
        -e "s/^auth_type = .*/auth_type = md5/" \
        -e "s|^logfile = .*|logfile = $TMP/pgbouncer-md5.log|" \
        -e "s|^pidfile = .*|pidfile = $TMP/pgbouncer-md5.pid|" \
        "$TMP/pgbouncer.ini" >"$TMP/pgbouncer-md5.ini"
    if [ "$IS_ROOT" -eq 1 ]; then chown postgres: "$TMP/pgbouncer-md5.ini"; fi
    log "starting pgbouncer (auth_type = md5) on 127.0.0.1:$MD5_BOUNCER_PORT"
    as_pg "$PGBOUNCER" -d "$TMP/pgbouncer-md5.ini" >"$TMP/pgbouncer-md5.stdout" 2>&1 \
        || { cat "$TMP/pgbouncer-md5.stdout" "$TMP/pgbouncer-md5.log" >&2 2>/dev/null; die "pgbouncer (md5) did not start"; }
    wait_ready pgbouncer "$MD5_BOUNCER_PORT" "" "$TMP/pgbouncer-md5.log"
}

# ---------------------------------------------------------------------------
# rlsgate.
# ---------------------------------------------------------------------------
RLSGATE_TOKEN=""
if [ "$SKIP_RLSGATE" != 1 ]; then
    RLSGATE_JWT_SECRET="bench-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    export RLSGATE_JWT_SECRET

    # ${RLSGATE_JWT_SECRET} stays literal in the file: rlsgate expands it.
    cat >"$TMP/rlsgate.toml" <<EOF
[server]
listen = "127.0.0.1:$RLSGATE_PORT"
pool_mode = "transaction"
pipeline_depth = ${BENCH_PIPELINE:-1}

[upstream]
host = "127.0.0.1"
port = $PG_PORT
database = "$DB"
user = "$APP_USER"
password = "$APP_PASSWORD"
sslmode = "disable"
pool_size = 20
transaction_wrap = ${BENCH_WRAP:-false}

[auth]
algorithms = ["HS256"]
hs_secret = "\${RLSGATE_JWT_SECRET}"
tenant_claim = "store_id"

[context]
"app.current_store_id" = "store_id"

[guard]
protected = ["app.*"]
EOF

    # Long enough for every run (5 cases x 3 targets x rounds x duration).
    total_s=$((5 * 3 * ROUNDS * (DURATION + 5)))
    ttl_h=$(( total_s / 3600 + 2 ))
    log "minting a token (rlsgate token --ttl ${ttl_h}h)"
    if ! RLSGATE_TOKEN=$("$RLSGATE_BIN" token --secret-env RLSGATE_JWT_SECRET \
            --claim store_id=bench --ttl "${ttl_h}h" 2>"$TMP/token.err"); then
        cat "$TMP/token.err" >&2
        die "'$RLSGATE_BIN token' failed"
    fi
    RLSGATE_TOKEN=$(printf '%s' "$RLSGATE_TOKEN" | tr -d '[:space:]')
    [[ $RLSGATE_TOKEN =~ ^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$ ]] \
        || die "'rlsgate token' printed something that is not a JWT: '$RLSGATE_TOKEN'"

    log "starting rlsgate on 127.0.0.1:$RLSGATE_PORT"
    "$RLSGATE_BIN" serve --config "$TMP/rlsgate.toml" >"$TMP/rlsgate.log" 2>&1 &
    RLSGATE_PID=$!
    wait_ready rlsgate "$RLSGATE_PORT" "$RLSGATE_PID" "$TMP/rlsgate.log"

    # Smoke test: the proxy answers and applies the tenant setting.
    got=$(PGPASSWORD=$RLSGATE_TOKEN "$PG_BIN/psql" -X -At -h 127.0.0.1 -p "$RLSGATE_PORT" \
            -U "$APP_USER" -d "$DB" -c "SELECT current_setting('app.current_store_id', true)" \
            2>"$TMP/smoke.err") || true
    if [ "$got" != bench ]; then
        cat "$TMP/smoke.err" >&2
        echo "----- rlsgate log" >&2; tail -n 30 "$TMP/rlsgate.log" >&2
        die "query through rlsgate did not see app.current_store_id = 'bench' (got '$got')"
    fi
fi

# Direct and PgBouncer paths answer too.
for target_port in "$PG_PORT" "$BOUNCER_PORT"; do
    PGPASSWORD=$APP_PASSWORD "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$target_port" \
        -U "$APP_USER" -d "$DB" -c "SELECT 1" >/dev/null \
        || die "cannot query as $APP_USER on 127.0.0.1:$target_port"
done

# ---------------------------------------------------------------------------
# Runs.
# ---------------------------------------------------------------------------
case_args() {
    case "$1" in
        select_simple)   echo "-S -M simple" ;;
        select_extended) echo "-S -M extended" ;;
        select_prepared) echo "-S -M prepared" ;;
        tpcb)            echo "-M simple" ;;
        churn)           echo "-S -M simple -C" ;;
    esac
}

TARGETS="direct rlsgate pgbouncer"
declare -A TPS_SUM=() RUNS=() ERRORS=() FAILED=() TX_SUM=() PROXY_TICKS=() PG_TICKS=()
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

# CPU ticks (user + system) of processes, from /proc/<pid>/stat (fields 14 and 15; with "all",
# also 16 and 17: children that exited and were reaped).
proc_ticks() { # all|own pid...
    local which=$1; shift
    local p total=0 t
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] || continue
        # the command name (field 2) may hold spaces: count fields after its ")"
        t=$(sed 's/^.*) //' "/proc/$p/stat" | awk -v all="$which" \
            '{ t = $12 + $13; if (all == "all") t += $14 + $15; print t }')
        total=$(( total + ${t:-0} ))
    done
    echo "$total"
}

# Postgres' CPU: the postmaster with its reaped children, plus its live children (backends
# pooled by a proxy live across runs; pgbench's own direct backends exit and are reaped).
pg_ticks() {
    local pm
    pm=$(head -n 1 "$TMP/data/postmaster.pid" 2>/dev/null) || { echo 0; return; }
    echo $(( $(proc_ticks all "$pm") + $(proc_ticks own $(pgrep -P "$pm" 2>/dev/null)) ))
}

proxy_ticks() { # target
    case "$1" in
        rlsgate)   proc_ticks own "$RLSGATE_PID" ;;
        pgbouncer) proc_ticks own "$(cat "$TMP/pgbouncer.pid" 2>/dev/null)" ;;
        pgbouncer_md5) proc_ticks own "$(cat "$TMP/pgbouncer-md5.pid" 2>/dev/null)" ;;
        *)         echo 0 ;;
    esac
}

# Average CPU microseconds per transaction over a case's runs.
us_per_tx() { # ticks-sum tx-sum
    if [ "${2:-0}" -gt 0 ]; then
        awk -v t="$1" -v n="$2" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }'
    else
        echo n/a
    fi
}

run_one() { # case target round
    local cname=$1 target=$2 round=$3 port password out rc tps failed
    case "$target" in
        direct)    port=$PG_PORT;       password=$APP_PASSWORD ;;
        pgbouncer) port=$BOUNCER_PORT;  password=$APP_PASSWORD ;;
        pgbouncer_md5) port=$MD5_BOUNCER_PORT; password=$APP_PASSWORD ;;
        rlsgate)   port=$RLSGATE_PORT;  password=$RLSGATE_TOKEN ;;
    esac
    out="$TMP/run-$cname-$target-$round.log"
    log "case=$cname target=$target round=$round/$ROUNDS"
    rc=0
    local proxy0 pg0 proxy1 pg1 tx
    proxy0=$(proxy_ticks "$target"); pg0=$(pg_ticks)
    # shellcheck disable=SC2046 # word splitting of the case arguments is intended
    PGPASSWORD=$password "$PG_BIN/pgbench" -n -T "$DURATION" -c "$CLIENTS" -j "$THREADS" \
        $(case_args "$cname") -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$out" 2>&1 || rc=$?
    sleep 0.2 # (let the postmaster reap the backends of the run)
    proxy1=$(proxy_ticks "$target"); pg1=$(pg_ticks)
    # pgbench 15: "tps = N (without initial connection time)", with -C
    # "tps = N (including reconnection times)".
    tps=$(sed -n 's/^tps = \([0-9][0-9.]*\) .*/\1/p' "$out" | tail -n 1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    local key="$cname/$target"
    FAILED[$key]=$(( ${FAILED[$key]:-0} + ${failed:-0} ))
    if [ "$rc" -ne 0 ] || [ -z "$tps" ]; then
        ERRORS[$key]=1
        {
            echo "----- pgbench exit $rc: case=$cname target=$target round=$round"
            grep -v '^progress:' "$out" | tail -n 15
        } >&2
        return 0
    fi
    TPS_SUM[$key]=$(awk -v a="${TPS_SUM[$key]:-0}" -v b="$tps" 'BEGIN { printf "%.6f", a + b }')
    RUNS[$key]=$(( ${RUNS[$key]:-0} + 1 ))
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    TX_SUM[$key]=$(( ${TX_SUM[$key]:-0} + ${tx:-0} ))
    PROXY_TICKS[$key]=$(( ${PROXY_TICKS[$key]:-0} + proxy1 - proxy0 ))
    PG_TICKS[$key]=$(( ${PG_TICKS[$key]:-0} + pg1 - pg0 ))
}

avg_tps() { # key -> number | error | skipped
    local key=$1
    if [ "${key#*/}" = rlsgate ] && [ "$SKIP_RLSGATE" = 1 ]; then echo skipped; return; fi
    if [ -n "${ERRORS[$key]:-}" ] || [ "${RUNS[$key]:-0}" -eq 0 ]; then echo error; return; fi
    awk -v s="${TPS_SUM[$key]}" -v n="${RUNS[$key]}" 'BEGIN { printf "%.0f", s / n }'
}

ratio() { # a b
    if [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] && awk -v b="$2" 'BEGIN { exit !(b > 0) }'; then
        awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
    else
        echo n/a
    fi
}

# Syscalls per transaction of a proxy: strace -c attached to the proxy's process (all its
# threads) during one extra short run of the case. strace slows the proxy down, so that run's
# TPS counts nowhere; the syscalls it needs per transaction are what is measured. Sets
# SYSCALLS[case/target] ("n/a" without strace or when it cannot attach) and logs the four most
# frequent calls per transaction.
STRACE=$(command -v strace || true)
declare -A SYSCALLS=()
syscalls_one() { # case target
    local cname=$1 target=$2 pid port password trace out spid tx calls
    local key="$cname/$target"
    SYSCALLS[$key]=n/a
    [ -n "$STRACE" ] || return 0
    case "$target" in
        rlsgate)   pid=$RLSGATE_PID; port=$RLSGATE_PORT; password=$RLSGATE_TOKEN ;;
        pgbouncer) pid=$(cat "$TMP/pgbouncer.pid" 2>/dev/null); port=$BOUNCER_PORT; password=$APP_PASSWORD ;;
        *) return 0 ;;
    esac
    [ -n "$pid" ] || return 0
    trace="$TMP/strace-$cname-$target.txt"
    out="$TMP/strace-run-$cname-$target.log"
    log "case=$cname target=$target: counting syscalls (strace -c, one 3 s run)"
    "$STRACE" -c -f -q -p "$pid" -o "$trace" 2>"$trace.err" &
    spid=$!
    sleep 1 # (attached to every thread before the run starts)
    # shellcheck disable=SC2046 # word splitting of the case arguments is intended
    PGPASSWORD=$password "$PG_BIN/pgbench" -n -T 3 -c "$CLIENTS" -j "$THREADS" \
        $(case_args "$cname") -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$out" 2>&1 || true
    kill -INT "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    calls=$(awk '$NF == "total" { print $4 }' "$trace" 2>/dev/null)
    if [ -z "$calls" ] || [ "${tx:-0}" -le 0 ]; then
        { echo "----- strace ($cname, $target) counted nothing:"; tail -n 3 "$trace.err" "$out"; } >&2
        return 0
    fi
    SYSCALLS[$key]=$(awk -v c="$calls" -v n="$tx" 'BEGIN { printf "%.2f", c / n }')
    log "case=$cname target=$target: ${SYSCALLS[$key]} syscalls/tx; most frequent per tx: $(
        awk -v n="$tx" '$1 ~ /^[0-9.]+$/ && $NF != "total" { printf "%s %.2f\n", $NF, $4 / n }' "$trace" \
            | sort -k2 -g -r | head -n 4 | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------
# Memory per idle client (case idle).
# ---------------------------------------------------------------------------
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null; }

# Start a fresh proxy of kind $1 on IDLE_PORT for up to $2 clients; sets IDLE_TARGET_PID and
# IDLE_PASSWORD (what idle_clients and the warm-up query log in with).
start_idle_target() { # rlsgate|pgbouncer max_clients
    local kind=$1 max=$2
    case "$kind" in
        rlsgate)
            sed -e "s/^listen = .*/listen = \"127.0.0.1:$IDLE_PORT\"\nmax_client_conn = $max/" \
                "$TMP/rlsgate.toml" >"$TMP/rlsgate-idle.toml"
            "$RLSGATE_BIN" serve --config "$TMP/rlsgate-idle.toml" >"$TMP/rlsgate-idle.log" 2>&1 &
            IDLE_TARGET_PID=$!
            EXTRA_PIDS="$EXTRA_PIDS $IDLE_TARGET_PID"
            IDLE_PASSWORD=$RLSGATE_TOKEN
            wait_ready rlsgate "$IDLE_PORT" "$IDLE_TARGET_PID" "$TMP/rlsgate-idle.log"
            ;;
        pgbouncer)
            IDLE_PASSWORD="idle-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
            printf '"idle" "%s"\n' "$IDLE_PASSWORD" >"$TMP/idle-userlist.txt"
            echo "host all idle 127.0.0.1/32 password" >"$TMP/idle-hba.conf"
            {
                echo "[databases]"
                echo "$DB = host=127.0.0.1 port=$PG_PORT dbname=$DB user=$APP_USER password=$APP_PASSWORD"
                echo
                echo "[pgbouncer]"
                echo "listen_addr = 127.0.0.1"
                echo "listen_port = $IDLE_PORT"
                echo "unix_socket_dir ="
                echo "auth_type = hba"
                echo "auth_hba_file = $TMP/idle-hba.conf"
                echo "auth_file = $TMP/idle-userlist.txt"
                echo "pool_mode = transaction"
                echo "default_pool_size = 20"
                echo "min_pool_size = 0"
                echo "reserve_pool_size = 0"
                echo "max_client_conn = $max"
                echo "max_db_connections = 20"
                echo "ignore_startup_parameters = extra_float_digits"
                echo "logfile = $TMP/pgbouncer-idle.log"
                echo "pidfile = $TMP/pgbouncer-idle.pid"
                echo "log_connections = 0"
                echo "log_disconnections = 0"
            } >"$TMP/pgbouncer-idle.ini"
            chmod 600 "$TMP/idle-userlist.txt"
            if [ "$IS_ROOT" -eq 1 ]; then
                chown postgres: "$TMP/idle-userlist.txt" "$TMP/idle-hba.conf" "$TMP/pgbouncer-idle.ini"
            fi
            rm -f "$TMP/pgbouncer-idle.log"
            # (runuser's PAM session resets the open-files limit: raise it again in there)
            as_pg sh -c 'ulimit -n "$(ulimit -Hn)"; exec "$0" "$@"' "$PGBOUNCER" -d "$TMP/pgbouncer-idle.ini" \
                >"$TMP/pgbouncer-idle.stdout" 2>&1 \
                || { cat "$TMP/pgbouncer-idle.stdout" "$TMP/pgbouncer-idle.log" >&2 2>/dev/null; die "pgbouncer (idle case) did not start"; }
            wait_ready pgbouncer "$IDLE_PORT" "" "$TMP/pgbouncer-idle.log"
            IDLE_TARGET_PID=$(cat "$TMP/pgbouncer-idle.pid")
            ;;
    esac
    # Warm-up: the first login opens the upstream connection and the proxy's lazily built state.
    PGPASSWORD=$IDLE_PASSWORD "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$IDLE_PORT" -U idle -d "$DB" \
        -c "SELECT 1" >/dev/null 2>"$TMP/idle-warmup.err" \
        || { cat "$TMP/idle-warmup.err" >&2; die "$kind (idle case) does not answer a query"; }
}

# Measure one proxy with n idle clients: sets IDLE_KB (KB per client, or "error") and
# IDLE_RSS ("<RSS before>/<RSS after>" in KB, or "n/a").
idle_measure() { # rlsgate|pgbouncer n
    local kind=$1 n=$2 before="" after="" connected="" out deadline idle_pid
    IDLE_KB=error IDLE_RSS=n/a
    start_idle_target "$kind" $((n + 100))
    sleep 1
    before=$(rss_kb "$IDLE_TARGET_PID")
    out="$TMP/idle-$kind-$n.out"
    IDLE_TOKEN=$IDLE_PASSWORD "$IDLE_BIN" "127.0.0.1:$IDLE_PORT" "$DB" "$n" >"$out" 2>"$out.err" &
    idle_pid=$!
    EXTRA_PIDS="$EXTRA_PIDS $idle_pid"
    deadline=$((SECONDS + 60 + n / 50))
    while [ "$SECONDS" -lt "$deadline" ] && kill -0 "$idle_pid" 2>/dev/null; do
        connected=$(sed -n 's/^connected \([0-9]*\)$/\1/p' "$out" 2>/dev/null | tail -n 1) || true
        [ -n "$connected" ] && break
        sleep 0.5
    done
    if [ "$connected" = "$n" ]; then
        sleep 3
        after=$(rss_kb "$IDLE_TARGET_PID")
    fi
    stop_pid "$idle_pid"
    stop_pid "$IDLE_TARGET_PID"
    if [ "$connected" != "$n" ] || [ -z "$before" ] || [ -z "$after" ]; then
        { echo "----- idle_clients ($kind, $n): connected '${connected:-none}'"; tail -n 5 "$out" "$out.err"; } >&2
        return 0
    fi
    IDLE_KB=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN { printf "%.2f", (a - b) / n }')
    IDLE_RSS="$before/$after"
}

idle_case() {
    local n rk=skipped rr=n/a
    for n in $IDLE_COUNTS; do
        if [ "$SKIP_RLSGATE" != 1 ]; then
            log "case=idle target=rlsgate clients=$n"
            idle_measure rlsgate "$n"
            rk=$IDLE_KB rr=$IDLE_RSS
        fi
        log "case=idle target=pgbouncer clients=$n"
        idle_measure pgbouncer "$n"
        echo "case=idle_$n rlsgate_kb_per_client=$rk pgbouncer_kb_per_client=$IDLE_KB" \
            "rlsgate/pgbouncer=$(ratio "$rk" "$IDLE_KB") rlsgate_rss_kb=$rr pgbouncer_rss_kb=$IDLE_RSS"
    done
}

# ---------------------------------------------------------------------------
# Signed against plain context (case signed).
# ---------------------------------------------------------------------------
SIGNED_PID=""
signed_setup() {
    psql_super -d "$DB" -v app_role="$APP_USER" -f "$ROOT/sql/hardened.sql" >"$TMP/hardened.out" 2>&1 \
        || { cat "$TMP/hardened.out" >&2; die "sql/hardened.sql failed"; }
    psql_super -d "$DB" >&2 <<EOF
CREATE TABLE rls_plain (id int PRIMARY KEY, store_id text NOT NULL, v int NOT NULL);
INSERT INTO rls_plain SELECT g, 'tenant' || (g % 10), g FROM generate_series(1, 100000) g;
CREATE INDEX ON rls_plain (store_id);
CREATE TABLE rls_signed (LIKE rls_plain INCLUDING ALL);
INSERT INTO rls_signed SELECT * FROM rls_plain;
ALTER TABLE rls_plain ENABLE ROW LEVEL SECURITY;
ALTER TABLE rls_signed ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON rls_plain
    USING (store_id = (SELECT nullif(current_setting('app.current_store_id', true), '')));
CREATE POLICY tenant ON rls_signed USING (store_id = (SELECT rlsgate.tenant()));
GRANT SELECT ON rls_plain, rls_signed TO $APP_USER;
VACUUM ANALYZE rls_plain, rls_signed;
EOF
    RLSGATE_SIGNING_KEY="bench-signing-key-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    export RLSGATE_SIGNING_KEY
    echo "SELECT rlsgate.install_key(:'key')" \
        | psql_super -d "$DB" -v key="$RLSGATE_SIGNING_KEY" >/dev/null \
        || die "installing the signing key failed"
    pick_port; SIGNED_PORT=$FREE_PORT
    # the same configuration on another port, with the signing keys in its [context] table
    # (${RLSGATE_SIGNING_KEY} stays literal in the file: rlsgate expands it)
    awk -v port="$SIGNED_PORT" '
        /^listen = / { print "listen = \"127.0.0.1:" port "\""; next }
        { print }
        /^\[context\]/ { print "mode = \"signed\""; print "signing_key = \"${RLSGATE_SIGNING_KEY}\"" }
    ' "$TMP/rlsgate.toml" >"$TMP/rlsgate-signed.toml"
    # (--allow-unsafe: rls_plain's policy reads the setting itself, a critical finding in signed
    # mode; it is there for the comparison)
    "$RLSGATE_BIN" serve --allow-unsafe --config "$TMP/rlsgate-signed.toml" >"$TMP/rlsgate-signed.log" 2>&1 &
    SIGNED_PID=$!
    EXTRA_PIDS="$EXTRA_PIDS $SIGNED_PID"
    wait_ready rlsgate "$SIGNED_PORT" "$SIGNED_PID" "$TMP/rlsgate-signed.log"
    local t got
    for t in 3 7; do
        "$RLSGATE_BIN" token --secret-env RLSGATE_JWT_SECRET --claim "store_id=tenant$t" --ttl 12h \
            2>"$TMP/token.err" | tr -d '[:space:]' >"$TMP/token-tenant$t"
        [ -s "$TMP/token-tenant$t" ] || { cat "$TMP/token.err" >&2; die "minting a token failed"; }
    done
    printf '\\set id random(1, 100000)\nSELECT v FROM rls_plain WHERE id = :id;\n' >"$TMP/rls_plain.sql"
    printf '\\set id random(1, 100000)\nSELECT v FROM rls_signed WHERE id = :id;\n' >"$TMP/rls_signed.sql"
    # smoke: the signed proxy serves its tenant's rows only
    got=$(PGPASSWORD=$(cat "$TMP/token-tenant3") "$PG_BIN/psql" -X -At -h 127.0.0.1 -p "$SIGNED_PORT" \
        -U "$APP_USER" -d "$DB" -c "SELECT count(*) FROM rls_signed" 2>"$TMP/smoke.err") || true
    if [ "$got" != 10000 ]; then
        cat "$TMP/smoke.err" >&2; tail -n 20 "$TMP/rlsgate-signed.log" >&2
        die "signed rlsgate: expected the 10000 rows of tenant3, got '$got'"
    fi
}

# One run of the signed case: variant (plain|signed), tenants (1|2), round; adds to the sums.
signed_run() {
    local variant=$1 tenants=$2 round=$3 port pid key out rc=0 tps=0 tx=0 p0 g0 f t c one n
    case "$variant" in
        plain)  port=$RLSGATE_PORT; pid=$RLSGATE_PID ;;
        signed) port=$SIGNED_PORT;  pid=$SIGNED_PID ;;
    esac
    key="signed_$tenants/$variant"
    log "case=signed tenants=$tenants variant=$variant round=$round/$ROUNDS"
    c=$(( CLIENTS / tenants )); [ "$c" -ge 1 ] || c=1
    p0=$(proc_ticks own "$pid"); g0=$(pg_ticks)
    local pids=""
    for t in 3 7; do
        if [ "$tenants" -eq 1 ] && [ "$t" = 7 ]; then continue; fi
        out="$TMP/run-signed-$tenants-$variant-$round-$t.log"
        PGPASSWORD=$(cat "$TMP/token-tenant$t") "$PG_BIN/pgbench" -n -T "$DURATION" -c "$c" \
            -j "$(( THREADS < c ? THREADS : c ))" -M extended -f "$TMP/rls_$variant.sql" \
            -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$out" 2>&1 &
        pids="$pids $!"
    done
    for p in $pids; do wait "$p" || rc=$?; done
    sleep 0.2 # (let the postmaster reap the backends of the run)
    for f in "$TMP"/run-signed-"$tenants"-"$variant"-"$round"-*.log; do
        one=$(sed -n 's/^tps = \([0-9][0-9.]*\) .*/\1/p' "$f" | tail -n 1)
        n=$(sed -n 's/^number of transactions actually processed: \([0-9][0-9]*\).*/\1/p' "$f" | tail -n 1)
        if [ -z "$one" ]; then rc=1; grep -v '^progress:' "$f" | tail -n 15 >&2; continue; fi
        tps=$(awk -v a="$tps" -v b="$one" 'BEGIN { printf "%.6f", a + b }')
        tx=$(( tx + ${n:-0} ))
    done
    if [ "$rc" -ne 0 ]; then ERRORS[$key]=1; return 0; fi
    TPS_SUM[$key]=$(awk -v a="${TPS_SUM[$key]:-0}" -v b="$tps" 'BEGIN { printf "%.6f", a + b }')
    RUNS[$key]=$(( ${RUNS[$key]:-0} + 1 ))
    TX_SUM[$key]=$(( ${TX_SUM[$key]:-0} + tx ))
    PROXY_TICKS[$key]=$(( ${PROXY_TICKS[$key]:-0} + $(proc_ticks own "$pid") - p0 ))
    PG_TICKS[$key]=$(( ${PG_TICKS[$key]:-0} + $(pg_ticks) - g0 ))
}

signed_case() {
    if [ "$SKIP_RLSGATE" = 1 ]; then echo "case=signed skipped"; return; fi
    signed_setup
    local tenants round v name pl sg line k
    for tenants in 1 2; do
        for round in $(seq "$ROUNDS"); do
            for v in plain signed; do signed_run "$v" "$tenants" "$round"; done
        done
        name=signed; [ "$tenants" -eq 2 ] && name=signed_2tenants
        pl=$(avg_tps "signed_$tenants/plain"); sg=$(avg_tps "signed_$tenants/signed")
        line="case=$name plain_tps=$pl signed_tps=$sg signed/plain=$(ratio "$sg" "$pl")"
        for v in plain signed; do
            k="signed_$tenants/$v"
            [ "${RUNS[$k]:-0}" -gt 0 ] || continue
            line="$line ${v}_pg_us=$(us_per_tx "${PG_TICKS[$k]}" "${TX_SUM[$k]}")"
            line="$line ${v}_proxy_us=$(us_per_tx "${PROXY_TICKS[$k]}" "${TX_SUM[$k]}")"
        done
        echo "$line"
    done
}

# Head-of-line blocking: latency percentiles of short selects next to 100 ms statements.
hol_case() {
    local target port password line="case=hol" dir p50 p99 tps
    printf 'SELECT pg_sleep(0.1);\n' >"$TMP/hol-sleep.sql"
    for target in $TARGETS; do
        if [ "$target" = rlsgate ] && [ "$SKIP_RLSGATE" = 1 ]; then continue; fi
        case "$target" in
            direct)    port=$PG_PORT;      password=$APP_PASSWORD ;;
            pgbouncer) port=$BOUNCER_PORT; password=$APP_PASSWORD ;;
            rlsgate)   port=$RLSGATE_PORT; password=$RLSGATE_TOKEN ;;
        esac
        log "case=hol target=$target"
        dir="$TMP/hol-$target"; mkdir -p "$dir"
        PGPASSWORD=$password "$PG_BIN/pgbench" -n -T $((DURATION + 2)) -c 2 -j 1 -f "$TMP/hol-sleep.sql" \
            -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$dir/sleep.log" 2>&1 &
        local sleeper=$!
        sleep 1
        (cd "$dir" && PGPASSWORD=$password "$PG_BIN/pgbench" -n -T "$DURATION" -c "$CLIENTS" -j "$THREADS" \
            -S -M extended -l --log-prefix=short -h 127.0.0.1 -p "$port" -U "$APP_USER" "$DB" >"$dir/short.log" 2>&1) || true
        wait "$sleeper" || true
        tps=$(sed -n 's/^tps = \([0-9][0-9.]*\) .*/\1/p' "$dir/short.log" | tail -n 1)
        # pgbench -l: the third field is the transaction's latency in microseconds
        read -r p50 p99 < <(cat "$dir"/short.* 2>/dev/null | awk '{ print $3 }' | sort -n | awk '
            { v[NR] = $1 } END { if (NR == 0) { print "n/a n/a"; exit }
              i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
              print v[i50], v[i99] }')
        line="$line ${target}_p50_us=$p50 ${target}_p99_us=$p99 ${target}_short_tps=${tps:-error}"
    done
    echo "$line"
}

log "cases: $CASES; $ROUNDS round(s) x ${DURATION}s, -c $CLIENTS -j $THREADS"
for cname in $CASES; do
    if [ "$cname" = idle ]; then idle_case; continue; fi
    if [ "$cname" = signed ]; then signed_case; continue; fi
    if [ "$cname" = hol ]; then hol_case; continue; fi
    targets=$TARGETS
    if [ "$cname" = churn ]; then start_md5_bouncer; targets="$TARGETS pgbouncer_md5"; fi
    for round in $(seq "$ROUNDS"); do
        for target in $targets; do
            if [ "$target" = rlsgate ] && [ "$SKIP_RLSGATE" = 1 ]; then continue; fi
            run_one "$cname" "$target" "$round"
        done
    done
    for target in rlsgate pgbouncer; do
        if [ "$target" = rlsgate ] && [ "$SKIP_RLSGATE" = 1 ]; then continue; fi
        syscalls_one "$cname" "$target"
    done
    d=$(avg_tps "$cname/direct")
    r=$(avg_tps "$cname/rlsgate")
    b=$(avg_tps "$cname/pgbouncer")
    line="case=$cname direct_tps=$d rlsgate_tps=$r pgbouncer_tps=$b"
    line="$line rlsgate/direct=$(ratio "$r" "$d") rlsgate/pgbouncer=$(ratio "$r" "$b")"
    if [ "$cname" = churn ]; then
        m=$(avg_tps "$cname/pgbouncer_md5")
        line="$line pgbouncer_md5_tps=$m rlsgate/pgbouncer_md5=$(ratio "$r" "$m")"
    fi
    for target in $targets; do
        f=${FAILED[$cname/$target]:-0}
        if [ "$f" -gt 0 ]; then line="$line ${target}_failed=$f"; fi
    done
    # CPU per transaction: Postgres for every target, the proxy's own process for the proxies
    for target in $targets; do
        k="$cname/$target"
        [ "${RUNS[$k]:-0}" -gt 0 ] || continue
        line="$line ${target}_pg_us=$(us_per_tx "${PG_TICKS[$k]}" "${TX_SUM[$k]}")"
        if [ "$target" != direct ]; then
            line="$line ${target}_proxy_us=$(us_per_tx "${PROXY_TICKS[$k]}" "${TX_SUM[$k]}")"
            line="$line ${target}_syscalls_per_tx=${SYSCALLS[$k]:-n/a}"
        fi
    done
    echo "$line"
done
