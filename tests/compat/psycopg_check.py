#!/usr/bin/env python3
"""Compatibility driver for psycopg 3 against rlsgate (run by tests/compat.rs via run.sh).

Environment: PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, TOKEN_NORTH, TOKEN_SOUTH (passwords),
COMPAT_CLIENTS (concurrent connections, default 10), COMPAT_DIR (scratch dir, unused here).
Optional, for running directly against Postgres without the proxy: COMPAT_USER_NORTH /
COMPAT_USER_SOUTH (user names per tenant, default PGUSER), COMPAT_DEADLINE (seconds, default 50).

Prints one JSON line per feature on stdout:
  {"driver": "psycopg3", "feature": ..., "ok": ..., "detail": ...}
Exit status 0 once the features ran (whatever their outcome), 2 when nothing could run.
"""

import json
import logging
import os
import sys
import threading
import time

DRIVER = "psycopg3"
from compat_common import (  # noqa: E402  (shared harness, next to this script)
    CANCEL_DELAYS,
    CLIENTS,
    CUSTOMER_IDS,
    DEADLINE,
    EXPECTED_CUSTOMERS,
    FEATURES,
    PGDATABASE,
    PGHOST,
    PGPORT,
    PGSSLMODE,
    PGUSER,
    PREPARED_RUNS,
    START,
    TOKENS,
    USERS,
    Results,
)
PRODUCTS_OVER_1 = {"north": 4, "south": 2}  # products with price > 1 per store


def fail_early(msg):
    print(f"{DRIVER}: {msg}", file=sys.stderr)
    sys.exit(2)


try:
    import psycopg
    from psycopg import errors as pgerrors
    from psycopg.pq import TransactionStatus
except ImportError as exc:  # pragma: no cover - environment problem
    fail_early(f"cannot import psycopg ({exc}); run tests/compat/install.sh")


RESULTS = Results()


def describe(exc):
    code = getattr(exc, "sqlstate", None)
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__} {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"


def connect(tenant):
    return psycopg.connect(
        host=PGHOST,
        port=PGPORT,
        dbname=PGDATABASE,
        user=USERS[tenant],
        password=TOKENS[tenant],
        sslmode=PGSSLMODE,
        connect_timeout=10,
        autocommit=True,
    )


def tenant_view(conn):
    row = conn.execute(
        "SELECT count(*), coalesce(string_agg(DISTINCT store_id, ','), '') FROM customers"
    ).fetchone()
    return int(row[0]), row[1]


def check_tenant(conn, tenant, where):
    """Returns None when the connection sees exactly its tenant's customers, else a description."""
    count, stores = tenant_view(conn)
    if count != EXPECTED_CUSTOMERS[tenant] or stores != tenant:
        return f"{where}: saw {count} customers of stores '{stores}', expected {EXPECTED_CUSTOMERS[tenant]} of '{tenant}'"
    return None


def feature(name, who, fn):
    """Run one feature for one connection, record ok/detail, never raise."""
    try:
        RESULTS.add(name, who, True, fn())
    except AssertionError as exc:
        RESULTS.add(name, who, False, str(exc))
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        RESULTS.add(name, who, False, describe(exc))


class Counter:
    def __init__(self):
        self.checks = 0
        self.problems = []
        self.reconnects = []


def usable(conn, tenant, where, counter):
    """The connection, or a new one when a feature left it broken (so later features still run)."""
    try:
        conn.execute("SELECT 1")
        return conn
    except Exception:  # noqa: BLE001
        counter.reconnects.append(where)
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
        return connect(tenant)


def isolation(conn, tenant, where, counter):
    """Tenant check after a feature; returns the connection to go on with."""
    counter.checks += 1
    try:
        conn = usable(conn, tenant, where, counter)
        problem = check_tenant(conn, tenant, where)
    except Exception as exc:  # noqa: BLE001
        problem = f"{where}: {describe(exc)}"
    if problem:
        counter.problems.append(problem)
    return conn


def isolation_result(who, counter):
    if counter.problems:
        RESULTS.add("isolation", who, False,
                    f"{len(counter.problems)}/{counter.checks} checks wrong, first: {counter.problems[0]}")
    else:
        RESULTS.add("isolation", who, True, f"{counter.checks} checks")
    if counter.reconnects:
        RESULTS.note(f"{who} reconnected because the connection was unusable {', '.join(counter.reconnects)}")


# psycopg logs "error ignored terminating <Pipeline>" for the deliberate error in a pipeline.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

def do_prepared(conn, tenant):
    query = "SELECT count(*) FROM customers WHERE customer_id <= %s"
    ids = CUSTOMER_IDS[tenant]
    runs = 0
    for k in range(PREPARED_RUNS):
        v = k % 7
        expected = sum(1 for i in ids if i <= v)
        if k % 5 == 4:
            # Two executions inside one explicit transaction, committed or rolled back.
            with conn.transaction(force_rollback=(k % 10 == 9)):
                for _ in range(2):
                    got = conn.execute(query, (v,), prepare=True).fetchone()[0]
                    runs += 1
                    assert got == expected, f"run {runs}: count for id <= {v} is {got}, expected {expected}"
        else:
            got = conn.execute(query, (v,), prepare=True).fetchone()[0]
            runs += 1
            assert got == expected, f"run {runs}: count for id <= {v} is {got}, expected {expected}"
    return (f"{runs} executions of a server-side prepared statement (prepare=True) in autocommit, "
            f"committed and rolled-back transactions, all correct")


def do_session_settings(conn, tenant):
    # Leak check: this client has not set anything yet, so it must not see other clients' settings.
    before = conn.execute("SHOW statement_timeout").fetchone()[0]
    assert before != "4321ms", f"before SET: saw statement_timeout={before} (another client's setting leaked)"
    conn.execute("SET statement_timeout = '4321ms'")
    conn.execute("SET search_path = public")
    conn.execute("SET TimeZone = 'Asia/Tokyo'")
    for rnd in range(3):
        # Unrelated transactions in between, so the pool may hand another server connection.
        tenant_view(conn)
        got = conn.execute("SHOW statement_timeout").fetchone()[0]
        assert got == "4321ms", f"round {rnd}: SHOW statement_timeout = {got}, expected 4321ms"
        got = conn.execute("SHOW TimeZone").fetchone()[0]
        assert got == "Asia/Tokyo", f"round {rnd}: SHOW TimeZone = {got}, expected Asia/Tokyo"
        got = conn.execute("SHOW search_path").fetchone()[0]
        assert got == "public", f"round {rnd}: SHOW search_path = {got}, expected public"
        with conn.transaction():
            got = conn.execute("SELECT current_setting('TimeZone'), current_setting('statement_timeout')").fetchone()
            assert tuple(got) == ("Asia/Tokyo", "4321ms"), f"round {rnd}: in BEGIN block saw {tuple(got)}"
    status = conn.info.parameter_status("TimeZone")
    assert status == "Asia/Tokyo", f"client-side ParameterStatus TimeZone = {status!r}, expected 'Asia/Tokyo'"
    return "SHOW in 9 later transactions and ParameterStatus(TimeZone) as set"


def do_cancel(conn, delay, use_safe):
    def cancel():
        if use_safe and hasattr(conn, "cancel_safe"):
            conn.cancel_safe()
        else:
            conn.cancel()

    api = "cancel_safe()" if use_safe and hasattr(conn, "cancel_safe") else "cancel()"
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
        assert elapsed >= delay - 0.05, f"cancelled after {elapsed:.2f}s, before this client's cancel at {delay}s: {msg}"
        assert elapsed <= delay + 5, f"cancelled only after {elapsed:.1f}s"
    finally:
        timer.cancel()
        timer.join()
    got = conn.execute("SELECT 1").fetchone()[0]
    assert got == 1, f"SELECT 1 after cancel returned {got}"
    return f"conn.{api} -> 57014 after {elapsed:.2f}s, SELECT 1 ok after"


def do_error_in_transaction(conn, tenant):
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT 1/0")
        raise AssertionError("SELECT 1/0 did not fail")
    except pgerrors.DivisionByZero:
        pass
    except psycopg.Error as exc:
        raise AssertionError(f"SELECT 1/0: expected 22012, got {describe(exc)}")
    try:
        conn.execute("SELECT 1")
        raise AssertionError("statement after the error did not fail")
    except pgerrors.InFailedSqlTransaction:
        pass
    except psycopg.Error as exc:
        raise AssertionError(f"statement after the error: expected 25P02, got {describe(exc)}")
    conn.execute("ROLLBACK")
    status = conn.info.transaction_status
    assert status == TransactionStatus.IDLE, f"after ROLLBACK the transaction status is {status.name}"
    problem = check_tenant(conn, tenant, "after ROLLBACK")
    assert problem is None, problem
    return "22012, then 25P02, ROLLBACK, tenant view intact"


def do_pipeline(conn, tenant):
    for rnd in range(3):
        v = 3 + rnd
        expected_ids = sum(1 for i in CUSTOMER_IDS[tenant] if i <= v)
        with conn.pipeline() as p:
            c1 = conn.execute("SELECT count(*) FROM customers")
            c2 = conn.execute("SELECT count(*) FROM products WHERE price > %s", (1,))
            c3 = conn.execute("SELECT %s::text || '-' || %s::text", ("a", str(rnd)))
            c4 = conn.execute("SELECT count(*) FROM customers WHERE %s >= customer_id", (v,), prepare=True)
            with conn.transaction():
                c5 = conn.execute("SELECT store_id FROM stores")
                c6 = conn.execute("SELECT count(*) FROM sales_transactions")
            p.sync()
            got = (c1.fetchone()[0], c2.fetchone()[0], c3.fetchone()[0], c4.fetchone()[0],
                   [r[0] for r in c5.fetchall()], c6.fetchone()[0])
        expected = (EXPECTED_CUSTOMERS[tenant], PRODUCTS_OVER_1[tenant], f"a-{rnd}", expected_ids,
                    [tenant], 2 if tenant == "north" else 1)
        assert got == expected, f"round {rnd}: got {got}, expected {expected}"
    # An error inside a pipeline: the rest of that sync is skipped, the connection stays usable.
    try:
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1/0")
            conn.execute("SELECT 2")
        raise AssertionError("error inside the pipeline was not raised")
    except pgerrors.DivisionByZero:
        pass
    problem = check_tenant(conn, tenant, "after pipeline error")
    assert problem is None, problem
    # The error read back mid-pipeline (psycopg sends a Flush to fetch it), then more statements
    # are queued behind it: the server skips them until the Sync at the end of the block.
    try:
        with conn.pipeline():
            cur = conn.execute("SELECT 1/0")
            try:
                cur.fetchone()
                raise AssertionError("SELECT 1/0 fetched mid-pipeline did not fail")
            except pgerrors.DivisionByZero:
                pass
            conn.execute("SELECT 2")
    except pgerrors.PipelineAborted:
        pass  # the skipped SELECT 2, reported when the block ends
    except psycopg.OperationalError as exc:
        try:
            conn.execute("SELECT 1")
            after = "connection still usable"
        except psycopg.Error as exc2:
            after = f"connection unusable afterwards ({describe(exc2)})"
        raise AssertionError(f"statements queued after an error fetched mid-pipeline: {describe(exc)}; {after}")
    problem = check_tenant(conn, tenant, "after an error fetched mid-pipeline")
    assert problem is None, problem
    return ("3 pipelines of 6 statements (incl. a transaction block) correct; 22012 at the end of a "
            "pipeline and 22012 fetched mid-pipeline with statements queued behind it handled")


def do_temp_table(n, tenant):
    conn = connect(tenant)
    try:
        conn.execute(f"CREATE TEMP TABLE scratch_{n} (x int)")
        conn.execute(f"INSERT INTO scratch_{n} VALUES (1), (2), (3)")
        with conn.transaction():
            got = conn.execute(f"SELECT count(*), sum(x) FROM scratch_{n}").fetchone()
        assert tuple(got) == (3, 6), f"read back {tuple(got)}, expected (3, 6)"
        conn.execute(f"INSERT INTO scratch_{n} VALUES (4)")
        got = conn.execute(f"SELECT sum(x) FROM scratch_{n}").fetchone()[0]
        assert got == 10, f"after a second insert sum is {got}, expected 10"
        problem = check_tenant(conn, tenant, "on the temp-table connection")
        assert problem is None, problem
        conn.execute(f"DROP TABLE scratch_{n}")
        return f"scratch_{n}: created, filled and read back in later transactions ({tenant})"
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def client(i):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"client {i} ({tenant})"
    counter = Counter()
    try:
        conn = connect(tenant)
    except Exception as exc:  # noqa: BLE001
        for f in ["prepared", "session_settings", "error_in_transaction", "isolation", "pipeline"]:
            RESULTS.add(f, who, False, f"connect: {describe(exc)}")
        if i < len(CANCEL_DELAYS):
            RESULTS.add("cancel", who, False, f"connect: {describe(exc)}")
        return
    try:
        conn = isolation(conn, tenant, "after connect", counter)
        if i < len(CANCEL_DELAYS):
            feature("cancel", who, lambda: do_cancel(conn, CANCEL_DELAYS[i], use_safe=(i == 1)))
            conn = isolation(conn, tenant, "after cancel", counter)
        feature("prepared", who, lambda: do_prepared(conn, tenant))
        conn = isolation(conn, tenant, "after prepared", counter)
        feature("error_in_transaction", who, lambda: do_error_in_transaction(conn, tenant))
        conn = isolation(conn, tenant, "after error_in_transaction", counter)
        feature("pipeline", who, lambda: do_pipeline(conn, tenant))
        conn = isolation(conn, tenant, "after pipeline", counter)
        feature("session_settings", who, lambda: do_session_settings(conn, tenant))
        conn = isolation(conn, tenant, "at the end", counter)
    finally:
        isolation_result(who, counter)
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass


def remaining():
    return DEADLINE - (time.monotonic() - START)


def main():
    # Probe: if not even one connection works, nothing can be judged.
    try:
        probe = connect("north")
        probe.execute("SELECT 1")
        probe.close()
    except Exception as exc:  # noqa: BLE001
        fail_early(f"cannot connect to {PGHOST}:{PGPORT}/{PGDATABASE}: {describe(exc)}")

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, remaining()))
    timed_out = any(t.is_alive() for t in threads)

    if not timed_out:
        # After the concurrent phase, so a connection pinned by a temporary table cannot starve it.
        temp = threading.Thread(
            target=feature, args=("temp_table", "temp client (north)", lambda: do_temp_table(CLIENTS, "north")), daemon=True
        )
        temp.start()
        temp.join(max(0.0, remaining()))
        timed_out = temp.is_alive()

    expected = {f: CLIENTS for f in FEATURES}
    expected["cancel"] = min(CLIENTS, len(CANCEL_DELAYS))
    expected["temp_table"] = 1
    for f in FEATURES:
        ok, detail = RESULTS.summary(f, expected[f])
        print(json.dumps({"driver": DRIVER, "feature": f, "ok": ok, "detail": detail}), flush=True)
    if timed_out:
        print(f"{DRIVER}: deadline of {DEADLINE:g}s reached, unfinished work abandoned", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
