#!/usr/bin/env python3
"""libpq 18 connection options against rlsgate, through psycopg 3 and the libpq 18 that
psycopg[binary] bundles (run by tests/compat.rs via run.sh):
  libpq18_check.py protocol-3.2  -> driver "libpq18-protocol-3.2": max_protocol_version=3.2
                                    (libpq asks for protocol 3.2; the server may answer with
                                    NegotiateProtocolVersion and go on with 3.0)
  libpq18_check.py direct-tls    -> driver "libpq18-direct-tls": sslnegotiation=direct,
                                    sslmode=require (TLS handshake first, no SSLRequest)

COMPAT_CLIENTS connections at once (tenants alternating). Features: isolation (tenant checks
after connect and after every feature), prepared (prepare=True, 10 runs per connection),
cancel (client 0: cancel_safe(), i.e. PQcancelCreate, which uses the connection's protocol
and TLS options; client 1: cancel(), i.e. PQcancel). Environment and output as in README.md.
"""

import json
import os
import sys
import threading
import time

from compat_common import (  # shared harness, next to this script
    CLIENTS,
    CUSTOMER_IDS,
    DEADLINE,
    EXPECTED_CUSTOMERS,
    PGDATABASE,
    PGHOST,
    PGPORT,
    PGSSLMODE,
    START,
    TOKENS,
    USERS,
    Results,
)

MODE = sys.argv[1] if len(sys.argv) > 1 else ""
if MODE not in ("protocol-3.2", "direct-tls"):
    print("usage: libpq18_check.py protocol-3.2|direct-tls", file=sys.stderr)
    sys.exit(2)
DRIVER = f"libpq18-{MODE}"
FEATURES = ["isolation", "prepared", "cancel"]
CANCEL_DELAYS = [0.5, 1.0]
RUNS = 10


def fail_early(msg):
    print(f"{DRIVER}: {msg}", file=sys.stderr)
    sys.exit(2)


try:
    import psycopg
    from psycopg import errors as pgerrors
except ImportError as exc:  # pragma: no cover - environment problem
    fail_early(f"cannot import psycopg ({exc}); run tests/compat/install.sh")

LIBPQ = psycopg.pq.version()
if LIBPQ < 180000:
    fail_early(f"psycopg uses libpq {LIBPQ}, these options need libpq 18 (psycopg[binary] bundles it)")

RESULTS = Results(FEATURES)


def describe(exc):
    code = getattr(exc, "sqlstate", None)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__} {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"


def connect(tenant):
    if MODE == "protocol-3.2":
        extra = {"max_protocol_version": "3.2", "sslmode": PGSSLMODE}
    else:
        extra = {"sslnegotiation": "direct", "sslmode": "require"}
    conn = psycopg.connect(host=PGHOST, port=PGPORT, dbname=PGDATABASE, user=USERS[tenant],
                           password=TOKENS[tenant], connect_timeout=10, autocommit=True, **extra)
    version = conn.pgconn.full_protocol_version
    if version not in (30000, 30002):
        conn.close()
        raise AssertionError(f"connected with protocol version {version}")
    if MODE == "direct-tls" and not conn.pgconn.ssl_in_use:
        conn.close()
        raise AssertionError("connected without TLS")
    return conn


def check_tenant(conn, tenant, where):
    row = conn.execute(
        "SELECT count(*), coalesce(string_agg(DISTINCT store_id, ','), '') FROM customers").fetchone()
    if tuple(row) != (EXPECTED_CUSTOMERS[tenant], tenant):
        return f"{where}: saw {row[0]} customers of stores '{row[1]}', expected {EXPECTED_CUSTOMERS[tenant]} of '{tenant}'"
    return None


def do_prepared(conn, tenant):
    for k in range(RUNS):
        v = k % 7
        want = sum(1 for i in CUSTOMER_IDS[tenant] if i <= v)
        if k % 3 == 2:
            with conn.transaction(force_rollback=(k % 2 == 0)):
                got = conn.execute("SELECT count(*) FROM customers WHERE customer_id <= %s", (v,), prepare=True).fetchone()[0]
        else:
            got = conn.execute("SELECT count(*) FROM customers WHERE customer_id <= %s", (v,), prepare=True).fetchone()[0]
        assert got == want, f"run {k}: count for id <= {v} is {got}, expected {want}"
    return f"{RUNS} executions of a named server statement (prepare=True) correct"


def do_cancel(conn, delay, safe):
    failures = []

    def cancel():
        try:
            conn.cancel_safe() if safe else conn.cancel()
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(describe(exc))

    timer = threading.Timer(delay, cancel)
    t0 = time.monotonic()
    timer.start()
    try:
        conn.execute("SELECT pg_sleep(10)")
        raise AssertionError(f"pg_sleep(10) was not cancelled (returned after {time.monotonic() - t0:.1f}s)")
    except pgerrors.QueryCanceled as exc:
        elapsed = time.monotonic() - t0
        msg = str(exc).strip().splitlines()[0]
        assert "timeout" not in msg, f"57014 but not from the cancel: {msg}"
        assert delay - 0.05 <= elapsed <= delay + 5, f"cancelled after {elapsed:.2f}s, this client cancels at {delay}s"
    finally:
        timer.cancel()
        timer.join()
    assert not failures, f"the cancel call failed: {failures[0]}"
    assert conn.execute("SELECT 1").fetchone()[0] == 1
    return f"{'cancel_safe() (PQcancelCreate)' if safe else 'cancel() (PQcancel)'} -> 57014, SELECT 1 ok after"


def client(i, versions):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"client {i} ({tenant})"
    checks, problems = 0, []
    try:
        conn = connect(tenant)
    except Exception as exc:  # noqa: BLE001
        for f in FEATURES:
            if f != "cancel" or i < len(CANCEL_DELAYS):
                RESULTS.add(f, who, False, f"connect: {describe(exc)}")
        return
    versions.add(conn.pgconn.full_protocol_version)

    def iso(where):
        nonlocal conn, checks
        checks += 1
        try:
            try:
                conn.execute("SELECT 1")
            except psycopg.Error:
                conn.close()
                conn = connect(tenant)
            p = check_tenant(conn, tenant, where)
        except Exception as exc:  # noqa: BLE001
            p = f"{where}: {describe(exc)}"
        if p:
            problems.append(p)

    def feature(name, fn):
        try:
            RESULTS.add(name, who, True, fn())
        except AssertionError as exc:
            RESULTS.add(name, who, False, str(exc))
        except Exception as exc:  # noqa: BLE001
            RESULTS.add(name, who, False, describe(exc))
        iso(f"after {name}")

    try:
        iso("after connect")
        if i < len(CANCEL_DELAYS):
            feature("cancel", lambda: do_cancel(conn, CANCEL_DELAYS[i], safe=(i == 0)))
        feature("prepared", lambda: do_prepared(conn, tenant))
    finally:
        if problems:
            RESULTS.add("isolation", who, False, f"{len(problems)}/{checks} checks wrong, first: {problems[0]}")
        else:
            RESULTS.add("isolation", who, True, f"{checks} checks")
        conn.close()


def remaining():
    return DEADLINE - (time.monotonic() - START)


def main():
    versions = set()
    threads = [threading.Thread(target=client, args=(i, versions), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, remaining()))
    timed_out = any(t.is_alive() for t in threads)
    expected = {"isolation": CLIENTS, "prepared": CLIENTS, "cancel": min(CLIENTS, len(CANCEL_DELAYS))}
    how = (f"libpq {LIBPQ}, protocol {', '.join(f'3.{v % 10000}' for v in sorted(versions)) or '?'}"
           + (", direct TLS" if MODE == "direct-tls" else ""))
    for f in FEATURES:
        ok, detail = RESULTS.summary(f, expected[f])
        print(json.dumps({"driver": DRIVER, "feature": f, "ok": ok, "detail": f"{how}: {detail}"[:700]}), flush=True)
    if timed_out:
        print(f"{DRIVER}: deadline of {DEADLINE:g}s reached, unfinished work abandoned", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
