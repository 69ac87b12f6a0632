#!/usr/bin/env python3
"""Compatibility driver for asyncpg against rlsgate (run by tests/compat.rs via run.sh).

Environment: PGHOST, PGPORT, PGDATABASE, PGUSER, PGSSLMODE, TOKEN_NORTH, TOKEN_SOUTH (passwords),
COMPAT_CLIENTS (concurrent connections, default 10), COMPAT_DIR (scratch dir, unused here).
Optional, for running directly against Postgres without the proxy: COMPAT_USER_NORTH /
COMPAT_USER_SOUTH (user names per tenant, default PGUSER), COMPAT_DEADLINE (seconds, default 50).

Prints one JSON line per feature on stdout:
  {"driver": "asyncpg", "feature": ..., "ok": ..., "detail": ...}
Exit status 0 once the features ran (whatever their outcome), 2 when nothing could run.

asyncpg always uses the extended protocol with named server-side statements for fetch*/prepare
(its statement cache), and the simple protocol for execute() without arguments.
"""

import asyncio
import json
import os
import sys
import time

DRIVER = "asyncpg"
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
PRODUCT_IDS = {"north": {1, 2, 3, 4}, "south": {5, 6, 7}}


def fail_early(msg):
    print(f"{DRIVER}: {msg}", file=sys.stderr)
    sys.exit(2)


try:
    import asyncpg
    from asyncpg import exceptions as pgexc
except ImportError as exc:  # pragma: no cover - environment problem
    fail_early(f"cannot import asyncpg ({exc}); run tests/compat/install.sh")


RESULTS = Results()


def describe(exc):
    code = getattr(exc, "sqlstate", None)
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__} {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"


async def connect(tenant):
    return await asyncpg.connect(
        host=PGHOST,
        port=PGPORT,
        database=PGDATABASE,
        user=USERS[tenant],
        password=TOKENS[tenant],
        ssl=PGSSLMODE,
        timeout=10,
    )


async def tenant_view(conn):
    row = await conn.fetchrow(
        "SELECT count(*), coalesce(string_agg(DISTINCT store_id, ','), '') FROM customers"
    )
    return int(row[0]), row[1]


async def check_tenant(conn, tenant, where):
    count, stores = await tenant_view(conn)
    if count != EXPECTED_CUSTOMERS[tenant] or stores != tenant:
        return f"{where}: saw {count} customers of stores '{stores}', expected {EXPECTED_CUSTOMERS[tenant]} of '{tenant}'"
    return None


async def feature(name, who, coro):
    """Run one feature coroutine, record ok/detail, never raise."""
    try:
        detail = await coro
        RESULTS.add(name, who, True, detail)
    except AssertionError as exc:
        RESULTS.add(name, who, False, str(exc))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure is reported
        RESULTS.add(name, who, False, describe(exc))


class Counter:
    def __init__(self):
        self.checks = 0
        self.problems = []
        self.reconnects = []


async def usable(conn, tenant, where, counter):
    """The connection, or a new one when a feature left it broken (so later features still run)."""
    try:
        await conn.fetchval("SELECT 1", timeout=10)
        return conn
    except Exception:  # noqa: BLE001
        counter.reconnects.append(where)
        conn.terminate()
        return await connect(tenant)


async def isolation(conn, tenant, where, counter):
    """Tenant check after a feature; returns the connection to go on with."""
    counter.checks += 1
    try:
        conn = await usable(conn, tenant, where, counter)
        problem = await check_tenant(conn, tenant, where)
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


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

async def do_prepared(conn, tenant):
    stmt = await conn.prepare("SELECT count(*) FROM customers WHERE customer_id <= $1")
    ids = CUSTOMER_IDS[tenant]
    runs = 0
    for k in range(PREPARED_RUNS):
        v = k % 7
        expected = sum(1 for i in ids if i <= v)
        if k % 5 == 4:
            # Two executions inside one explicit transaction, committed or rolled back.
            tr = conn.transaction()
            await tr.start()
            try:
                for _ in range(2):
                    got = await stmt.fetchval(v)
                    runs += 1
                    assert got == expected, f"prepare() run {runs}: count for id <= {v} is {got}, expected {expected}"
            except BaseException:
                await tr.rollback()
                raise
            if k % 10 == 9:
                await tr.rollback()
            else:
                await tr.commit()
        else:
            got = await stmt.fetchval(v)
            runs += 1
            assert got == expected, f"prepare() run {runs}: count for id <= {v} is {got}, expected {expected}"
    # Plain fetchval with arguments: asyncpg prepares it once and reuses it from its statement cache.
    pids = PRODUCT_IDS[tenant]
    cached = 0
    for k in range(PREPARED_RUNS):
        v = k % 9
        expected = sum(1 for i in pids if i <= v)
        got = await conn.fetchval("SELECT count(*) FROM products WHERE product_id <= $1", v)
        cached += 1
        assert got == expected, f"fetchval run {cached}: count for product id <= {v} is {got}, expected {expected}"
    return (f"{runs} executions of conn.prepare() (autocommit, committed and rolled-back transactions) "
            f"and {cached} of cached fetchval, all correct")


async def do_session_settings(conn, tenant):
    # Leak check: this client has not set anything yet, so it must not see other clients' settings.
    before = await conn.fetchval("SHOW statement_timeout")
    assert before != "4321ms", f"before SET: saw statement_timeout={before} (another client's setting leaked)"
    await conn.execute("SET statement_timeout = '4321ms'")
    await conn.execute("SET search_path = public")
    await conn.execute("SET TimeZone = 'Asia/Tokyo'")
    for rnd in range(3):
        await tenant_view(conn)
        got = await conn.fetchval("SHOW statement_timeout")
        assert got == "4321ms", f"round {rnd}: SHOW statement_timeout = {got}, expected 4321ms"
        got = await conn.fetchval("SHOW TimeZone")
        assert got == "Asia/Tokyo", f"round {rnd}: SHOW TimeZone = {got}, expected Asia/Tokyo"
        got = await conn.fetchval("SHOW search_path")
        assert got == "public", f"round {rnd}: SHOW search_path = {got}, expected public"
        async with conn.transaction():
            got = await conn.fetchrow("SELECT current_setting('TimeZone'), current_setting('statement_timeout')")
            assert tuple(got) == ("Asia/Tokyo", "4321ms"), f"round {rnd}: in a transaction block saw {tuple(got)}"
    status = getattr(conn.get_settings(), "TimeZone", None)
    assert status == "Asia/Tokyo", f"client-side ParameterStatus TimeZone (get_settings()) = {status!r}, expected 'Asia/Tokyo'"
    return "SHOW in 9 later transactions and get_settings().TimeZone as set"


async def do_cancel(conn, delay, use_wait_for):
    # asyncpg has no public cancel(): on a timeout (timeout= or a cancelled task) it sends a
    # CancelRequest on a new connection and waits for the server to end the statement (57014
    # plus ReadyForQuery) before the connection can run anything else. So the cancel worked if
    # the connection is usable again well before pg_sleep(10) would have finished.
    t0 = time.monotonic()
    try:
        if use_wait_for:
            await asyncio.wait_for(conn.fetch("SELECT pg_sleep(10)"), timeout=delay)
        else:
            await conn.fetch("SELECT pg_sleep(10)", timeout=delay)
        raise AssertionError(f"pg_sleep(10) returned after {time.monotonic() - t0:.1f}s instead of timing out")
    except asyncio.TimeoutError:
        pass
    except pgexc.QueryCanceledError as exc:
        # Only possible if the server ended the statement before the client's timeout.
        raise AssertionError(f"57014 after {time.monotonic() - t0:.2f}s, before this client's cancel at {delay}s: {exc}")
    timed_out = time.monotonic() - t0
    got = await conn.fetchval("SELECT 1", timeout=10)
    ready = time.monotonic() - t0
    assert got == 1, f"SELECT 1 after the cancel returned {got}"
    assert ready <= delay + 5, f"connection usable only {ready:.1f}s after the query started (cancel not effective)"
    assert not conn.is_in_transaction(), "connection left in a transaction after the cancel"
    api = "asyncio.wait_for" if use_wait_for else "fetch(timeout=)"
    return f"{api} timed out at {timed_out:.2f}s, CancelRequest ended pg_sleep(10); SELECT 1 ok at {ready:.2f}s"


async def do_error_in_transaction(conn, tenant):
    # Round 1: explicit BEGIN/ROLLBACK (simple protocol), failing statements via extended protocol.
    await conn.execute("BEGIN")
    try:
        await conn.fetchval("SELECT 1/0")
        raise AssertionError("SELECT 1/0 did not fail")
    except pgexc.DivisionByZeroError:
        pass
    except asyncpg.PostgresError as exc:
        raise AssertionError(f"SELECT 1/0: expected 22012, got {describe(exc)}")
    try:
        await conn.fetchval("SELECT 1")
        raise AssertionError("statement after the error did not fail")
    except pgexc.InFailedSQLTransactionError:
        pass
    except asyncpg.PostgresError as exc:
        raise AssertionError(f"statement after the error: expected 25P02, got {describe(exc)}")
    await conn.execute("ROLLBACK")
    assert not conn.is_in_transaction(), "still in a transaction after ROLLBACK"
    problem = await check_tenant(conn, tenant, "after ROLLBACK")
    assert problem is None, problem

    # Round 2: asyncpg's transaction() context manager rolls back on the exception.
    class Abort(Exception):
        pass

    try:
        async with conn.transaction():
            try:
                await conn.execute("SELECT 1/0")  # simple protocol this time
                raise AssertionError("SELECT 1/0 (simple protocol) did not fail")
            except pgexc.DivisionByZeroError:
                pass
            try:
                await conn.execute("SELECT 1")
                raise AssertionError("statement after the error did not fail (simple protocol)")
            except pgexc.InFailedSQLTransactionError:
                pass
            raise Abort()
    except Abort:
        pass
    assert not conn.is_in_transaction(), "still in a transaction after transaction() rolled back"
    problem = await check_tenant(conn, tenant, "after transaction() rollback")
    assert problem is None, problem
    return "22012, then 25P02, ROLLBACK, tenant view intact (extended and simple protocol)"


async def do_pipeline(conn, tenant, i):
    # executemany pipelines Bind/Execute for every row behind one Sync.
    ins = "INSERT INTO customers (store_id, name, email) VALUES ($1, $2, $3)"
    other = "south" if tenant == "north" else "north"
    base = EXPECTED_CUSTOMERS[tenant]
    rows = [(tenant, f"Pipeline {k}", f"asyncpg-{i}-{k}@{tenant}.example") for k in range(5)]
    tr = conn.transaction()
    await tr.start()
    try:
        await conn.executemany(ins, rows)
        got = await conn.fetchval("SELECT count(*) FROM customers")
        assert got == base + 5, f"after executemany of 5 rows the tenant sees {got} customers, expected {base + 5}"
    finally:
        await tr.rollback()
    # A batch with a row for the other tenant fails as a whole (RLS WITH CHECK).
    tr = conn.transaction()
    await tr.start()
    try:
        bad = rows[:2] + [(other, "Intruder", f"asyncpg-{i}-x@{other}.example")]
        try:
            await conn.executemany(ins, bad)
            raise AssertionError("executemany with a row for the other tenant was accepted")
        except pgexc.InsufficientPrivilegeError:
            pass
    finally:
        await tr.rollback()
    got = await conn.fetchval("SELECT count(*) FROM customers")
    assert got == base, f"after the rolled-back batches the tenant sees {got} customers, expected {base}"
    return "executemany of 5 inserts correct; a batch with another tenant's row refused (42501); rolled back"


async def do_temp_table(n, tenant):
    conn = await connect(tenant)
    try:
        await conn.execute(f"CREATE TEMP TABLE scratch_{n} (x int)")
        await conn.execute(f"INSERT INTO scratch_{n} VALUES (1), (2), (3)")
        async with conn.transaction():
            got = await conn.fetchrow(f"SELECT count(*), sum(x) FROM scratch_{n}")
        assert tuple(got) == (3, 6), f"read back {tuple(got)}, expected (3, 6)"
        await conn.execute(f"INSERT INTO scratch_{n} VALUES ($1)", 4)
        got = await conn.fetchval(f"SELECT sum(x) FROM scratch_{n}")
        assert got == 10, f"after a second insert sum is {got}, expected 10"
        problem = await check_tenant(conn, tenant, "on the temp-table connection")
        assert problem is None, problem
        await conn.execute(f"DROP TABLE scratch_{n}")
        return f"scratch_{n}: created, filled and read back in later transactions ({tenant})"
    finally:
        await conn.close(timeout=5)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

async def client(i):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"client {i} ({tenant})"
    counter = Counter()
    try:
        conn = await connect(tenant)
    except Exception as exc:  # noqa: BLE001
        for f in ["prepared", "session_settings", "error_in_transaction", "isolation", "pipeline"]:
            RESULTS.add(f, who, False, f"connect: {describe(exc)}")
        if i < len(CANCEL_DELAYS):
            RESULTS.add("cancel", who, False, f"connect: {describe(exc)}")
        return
    try:
        conn = await isolation(conn, tenant, "after connect", counter)
        if i < len(CANCEL_DELAYS):
            await feature("cancel", who, do_cancel(conn, CANCEL_DELAYS[i], use_wait_for=(i == 1)))
            conn = await isolation(conn, tenant, "after cancel", counter)
        await feature("prepared", who, do_prepared(conn, tenant))
        conn = await isolation(conn, tenant, "after prepared", counter)
        await feature("error_in_transaction", who, do_error_in_transaction(conn, tenant))
        conn = await isolation(conn, tenant, "after error_in_transaction", counter)
        await feature("pipeline", who, do_pipeline(conn, tenant, i))
        conn = await isolation(conn, tenant, "after pipeline", counter)
        await feature("session_settings", who, do_session_settings(conn, tenant))
        conn = await isolation(conn, tenant, "at the end", counter)
    finally:
        isolation_result(who, counter)
        try:
            await conn.close(timeout=5)
        except Exception:  # noqa: BLE001
            conn.terminate()


def remaining():
    return max(0.1, DEADLINE - (time.monotonic() - START))


async def run():
    try:
        probe = await connect("north")
        await probe.fetchval("SELECT 1")
        await probe.close()
    except Exception as exc:  # noqa: BLE001
        fail_early(f"cannot connect to {PGHOST}:{PGPORT}/{PGDATABASE}: {describe(exc)}")

    timed_out = False
    tasks = [asyncio.ensure_future(client(i)) for i in range(CLIENTS)]
    done, pending = await asyncio.wait(tasks, timeout=remaining())
    for t in done:
        if t.exception() is not None:
            print(f"{DRIVER}: client task failed: {t.exception()!r}", file=sys.stderr)
    if pending:
        timed_out = True
    else:
        # After the concurrent phase, so a connection pinned by a temporary table cannot starve it.
        temp = asyncio.ensure_future(feature("temp_table", "temp client (north)", do_temp_table(CLIENTS, "north")))
        done, pending = await asyncio.wait([temp], timeout=remaining())
        timed_out = bool(pending)

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
    asyncio.run(run())
