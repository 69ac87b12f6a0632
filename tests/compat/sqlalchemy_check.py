#!/usr/bin/env python3
"""Compatibility driver for SQLAlchemy 2 against rlsgate (run by tests/compat.rs via run.sh):
  sqlalchemy_check.py psycopg   -> driver "sqlalchemy-psycopg" (postgresql+psycopg, threads)
  sqlalchemy_check.py asyncpg   -> driver "sqlalchemy-asyncpg" (postgresql+asyncpg, asyncio)

One engine per tenant (the token is the password) with SQLAlchemy's own pool (pool_size 3, no
overflow) shared by COMPAT_CLIENTS/2 workers, so pooled client connections move between workers
while rlsgate moves their transactions between its server connections. Features: isolation,
prepared, error_in_transaction, server_cursor. Environment and output as in README.md.
"""

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from typing import Optional

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

FLAVOUR = sys.argv[1] if len(sys.argv) > 1 else ""
if FLAVOUR not in ("psycopg", "asyncpg"):
    print("usage: sqlalchemy_check.py psycopg|asyncpg", file=sys.stderr)
    sys.exit(2)
DRIVER = f"sqlalchemy-{FLAVOUR}"
FEATURES = ["isolation", "prepared", "error_in_transaction", "server_cursor"]
RUNS = 20
POOL_SIZE = 3


def fail_early(msg):
    print(f"{DRIVER}: {msg}", file=sys.stderr)
    sys.exit(2)


try:
    import sqlalchemy
    from sqlalchemy import BigInteger, Identity, String, func, select, text
    from sqlalchemy.engine import URL
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
except ImportError as exc:  # pragma: no cover - environment problem
    fail_early(f"cannot import sqlalchemy ({exc}); run tests/compat/install.sh")

RESULTS = Results(FEATURES)


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    customer_id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    store_id: Mapped[str] = mapped_column(String)
    name: Mapped[str] = mapped_column(String)
    email: Mapped[Optional[str]] = mapped_column(String)


COUNT = select(func.count()).select_from(Customer)


class Rollback(Exception):
    """Raised to leave a transaction block so that it rolls back."""


def sqlstate(exc):
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)


def describe(exc):
    code = sqlstate(exc)
    msg = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    msg = msg[0] if msg else type(exc).__name__
    return f"{type(exc).__name__} {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"


def url(tenant):
    return URL.create(
        f"postgresql+{FLAVOUR}",
        username=USERS[tenant],
        password=TOKENS[tenant],
        host=PGHOST,
        port=PGPORT,
        database=PGDATABASE,
    )


def new_email(tenant):
    return f"sqla-{uuid.uuid4().hex[:12]}@{tenant}.example"


def check_rows(tenant, count, stores, where):
    want = EXPECTED_CUSTOMERS[tenant]
    if count != want or stores != [tenant]:
        return f"{where}: saw {count} customers of stores {stores}, expected {want} of ['{tenant}']"
    return None


def in_range(tenant, v):
    return sum(1 for i in CUSTOMER_IDS[tenant] if i <= v)


def remaining():
    return DEADLINE - (time.monotonic() - START)


def emit(expected):
    for f in FEATURES:
        ok, detail = RESULTS.summary(f, expected)
        print(json.dumps({"driver": DRIVER, "feature": f, "ok": ok, "detail": detail}), flush=True)


# --------------------------------------------------------------------------------------------
# postgresql+psycopg: threads, one Engine per tenant
# --------------------------------------------------------------------------------------------

def sync_isolation(engine, tenant, where):
    """Core and ORM views of the tenant; None when both are right."""
    with engine.connect() as c:
        n = c.execute(COUNT).scalar_one()
        stores = [r[0] for r in c.execute(select(Customer.store_id).distinct())]
    problem = check_rows(tenant, n, stores, f"{where} (Core)")
    if problem:
        return problem
    with Session(engine) as s:
        rows = s.scalars(select(Customer).order_by(Customer.customer_id)).all()
        other = s.get(Customer, 4 if tenant == "north" else 1)
    if {r.customer_id for r in rows} != CUSTOMER_IDS[tenant] or other is not None:
        return (f"{where} (ORM): ids {[r.customer_id for r in rows]}, other tenant's customer "
                f"{'visible' if other is not None else 'hidden'}")
    return None


def sync_prepared(engine, tenant):
    stmt = select(func.count()).select_from(Customer).where(Customer.customer_id <= sqlalchemy.bindparam("v"))
    names = set()
    for k in range(RUNS):
        v = k % 7
        with engine.connect() as c:  # a pool checkout per run: connections move between workers
            got = c.execute(stmt, {"v": v}).scalar_one()
            (c.rollback if k % 10 == 9 else c.commit)()
            names.update(c.connection.driver_connection._prepared._names.values())
        assert got == in_range(tenant, v), f"run {k}: count for id <= {v} is {got}, expected {in_range(tenant, v)}"
    assert names, "psycopg never prepared the statement (prepare_threshold 5)"
    return f"{RUNS} pooled executions correct; psycopg prepared them server-side (prepare_threshold 5)"


def sync_error_in_transaction(engine, tenant):
    with Session(engine) as s:
        before = s.scalar(COUNT)
        s.commit()
        try:
            with s.begin():
                s.add(Customer(store_id=tenant, name="SQLAlchemy rollback", email=new_email(tenant)))
                s.flush()
                inside = s.scalar(COUNT)
                assert inside == before + 1, f"inside the transaction the new row is not visible ({inside})"
                try:
                    s.execute(text("SELECT 1/0"))
                    raise AssertionError("SELECT 1/0 did not fail")
                except DBAPIError as exc:
                    assert sqlstate(exc) == "22012", f"SELECT 1/0: {describe(exc)}"
                try:
                    s.execute(text("SELECT 1"))
                    raise AssertionError("statement after the error did not fail")
                except DBAPIError as exc:
                    assert sqlstate(exc) == "25P02", f"after the error: {describe(exc)}"
                raise Rollback()
        except Rollback:
            pass
        after = s.scalar(COUNT)
        assert after == before, f"after the rollback {after} customers, expected {before}"
        # a write rolled back without an error
        s.add(Customer(store_id=tenant, name="SQLAlchemy rollback 2", email=new_email(tenant)))
        s.flush()
        s.rollback()
        after = s.scalar(COUNT)
        assert after == before, f"after session.rollback() {after} customers, expected {before}"
        s.commit()
    return "Session.begin(): insert, 22012, 25P02, rolled back; flush + rollback(): write undone"


def sync_server_cursor(engine, tenant):
    with engine.connect() as c:
        result = c.execution_options(stream_results=True, max_row_buffer=1).execute(
            select(Customer.customer_id, Customer.store_id).order_by(Customer.customer_id))
        kind = type(result.cursor).__name__
        rows = []
        for row in result:
            rows.append(tuple(row))
            time.sleep(0.01)  # other clients' transactions run meanwhile
        c.commit()
    assert "ServerCursor" in kind, f"stream_results used a {kind}, not a server-side cursor"
    assert [r[0] for r in rows] == sorted(CUSTOMER_IDS[tenant]) and {r[1] for r in rows} == {tenant}, f"streamed {rows}"
    with Session(engine) as s:
        ids = [cu.customer_id for cu in s.scalars(select(Customer).order_by(Customer.customer_id)
                                                  .execution_options(yield_per=1))]
        s.commit()
    assert ids == sorted(CUSTOMER_IDS[tenant]), f"yield_per(1) gave {ids}"
    return "stream_results (psycopg ServerCursor) and ORM yield_per(1) fetch row by row, tenant's rows only"


def sync_worker(i, engines):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"worker {i} ({tenant})"
    engine = engines[tenant]
    checks, problems = 0, []

    def iso(where):
        nonlocal checks
        checks += 1
        try:
            p = sync_isolation(engine, tenant, where)
        except Exception as exc:  # noqa: BLE001
            p = f"{where}: {describe(exc)}"
        if p:
            problems.append(p)

    def feature(name, fn):
        try:
            RESULTS.add(name, who, True, fn(engine, tenant))
        except AssertionError as exc:
            RESULTS.add(name, who, False, str(exc))
        except Exception as exc:  # noqa: BLE001
            RESULTS.add(name, who, False, describe(exc))
        iso(f"after {name}")

    iso("at the start")
    feature("prepared", sync_prepared)
    feature("error_in_transaction", sync_error_in_transaction)
    feature("server_cursor", sync_server_cursor)
    if problems:
        RESULTS.add("isolation", who, False, f"{len(problems)}/{checks} checks wrong, first: {problems[0]}")
    else:
        RESULTS.add("isolation", who, True, f"{checks} checks")


def main_sync():
    engines = {
        t: sqlalchemy.create_engine(
            url(t), pool_size=POOL_SIZE, max_overflow=0, pool_timeout=30,
            connect_args={"sslmode": PGSSLMODE, "connect_timeout": 10})
        for t in ("north", "south")
    }
    try:
        with engines["north"].connect() as c:
            c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        fail_early(f"cannot connect to {PGHOST}:{PGPORT}/{PGDATABASE}: {describe(exc)}")
    threads = [threading.Thread(target=sync_worker, args=(i, engines), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, remaining()))
    timed_out = any(t.is_alive() for t in threads)
    emit(CLIENTS)
    if timed_out:
        print(f"{DRIVER}: deadline of {DEADLINE:g}s reached, unfinished work abandoned", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)
    for e in engines.values():
        e.dispose()


# --------------------------------------------------------------------------------------------
# postgresql+asyncpg: asyncio tasks, one AsyncEngine per tenant
# --------------------------------------------------------------------------------------------

async def async_isolation(engine, tenant, where):
    from sqlalchemy.ext.asyncio import AsyncSession

    async with engine.connect() as c:
        n = (await c.execute(COUNT)).scalar_one()
        stores = [r[0] for r in await c.execute(select(Customer.store_id).distinct())]
    problem = check_rows(tenant, n, stores, f"{where} (Core)")
    if problem:
        return problem
    async with AsyncSession(engine) as s:
        rows = (await s.scalars(select(Customer).order_by(Customer.customer_id))).all()
        other = await s.get(Customer, 4 if tenant == "north" else 1)
    if {r.customer_id for r in rows} != CUSTOMER_IDS[tenant] or other is not None:
        return (f"{where} (ORM): ids {[r.customer_id for r in rows]}, other tenant's customer "
                f"{'visible' if other is not None else 'hidden'}")
    return None


async def async_prepared(engine, tenant):
    stmt = select(func.count()).select_from(Customer).where(Customer.customer_id <= sqlalchemy.bindparam("v"))
    cached = 0
    for k in range(RUNS):
        v = k % 7
        async with engine.connect() as c:
            got = (await c.execute(stmt, {"v": v})).scalar_one()
            if k % 10 == 9:
                await c.rollback()
            else:
                await c.commit()
            raw = await c.get_raw_connection()
            cached = max(cached, len(raw.dbapi_connection._prepared_statement_cache))
        assert got == in_range(tenant, v), f"run {k}: count for id <= {v} is {got}, expected {in_range(tenant, v)}"
    assert cached > 0, "the dialect's prepared statement cache stayed empty"
    return f"{RUNS} pooled executions correct through the dialect's cached asyncpg prepared statements"


async def async_error_in_transaction(engine, tenant):
    from sqlalchemy.ext.asyncio import AsyncSession

    async with AsyncSession(engine) as s:
        before = await s.scalar(COUNT)
        await s.commit()
        try:
            async with s.begin():
                s.add(Customer(store_id=tenant, name="SQLAlchemy rollback", email=new_email(tenant)))
                await s.flush()
                inside = await s.scalar(COUNT)
                assert inside == before + 1, f"inside the transaction the new row is not visible ({inside})"
                try:
                    await s.execute(text("SELECT 1/0"))
                    raise AssertionError("SELECT 1/0 did not fail")
                except DBAPIError as exc:
                    assert sqlstate(exc) == "22012", f"SELECT 1/0: {describe(exc)}"
                try:
                    await s.execute(text("SELECT 1"))
                    raise AssertionError("statement after the error did not fail")
                except DBAPIError as exc:
                    assert sqlstate(exc) == "25P02", f"after the error: {describe(exc)}"
                raise Rollback()
        except Rollback:
            pass
        after = await s.scalar(COUNT)
        assert after == before, f"after the rollback {after} customers, expected {before}"
        s.add(Customer(store_id=tenant, name="SQLAlchemy rollback 2", email=new_email(tenant)))
        await s.flush()
        await s.rollback()
        after = await s.scalar(COUNT)
        assert after == before, f"after session.rollback() {after} customers, expected {before}"
        await s.commit()
    return "AsyncSession.begin(): insert, 22012, 25P02, rolled back; flush + rollback(): write undone"


async def async_server_cursor(engine, tenant):
    from sqlalchemy.ext.asyncio import AsyncSession

    async with engine.connect() as c:
        result = await c.stream(select(Customer.customer_id, Customer.store_id).order_by(Customer.customer_id))
        rows = []
        async for row in result:
            rows.append(tuple(row))
            await asyncio.sleep(0.01)  # other clients' transactions run meanwhile
        await c.commit()
    assert [r[0] for r in rows] == sorted(CUSTOMER_IDS[tenant]) and {r[1] for r in rows} == {tenant}, f"streamed {rows}"
    async with AsyncSession(engine) as s:
        ids = [cu.customer_id async for cu in await s.stream_scalars(
            select(Customer).order_by(Customer.customer_id).execution_options(yield_per=1))]
        await s.commit()
    assert ids == sorted(CUSTOMER_IDS[tenant]), f"yield_per(1) gave {ids}"
    return "AsyncConnection.stream() (asyncpg cursor) and AsyncSession.stream_scalars(yield_per=1), tenant's rows only"


async def async_worker(i, engines):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"task {i} ({tenant})"
    engine = engines[tenant]
    checks, problems = 0, []

    async def iso(where):
        nonlocal checks
        checks += 1
        try:
            p = await async_isolation(engine, tenant, where)
        except Exception as exc:  # noqa: BLE001
            p = f"{where}: {describe(exc)}"
        if p:
            problems.append(p)

    async def feature(name, fn):
        try:
            RESULTS.add(name, who, True, await fn(engine, tenant))
        except AssertionError as exc:
            RESULTS.add(name, who, False, str(exc))
        except Exception as exc:  # noqa: BLE001
            RESULTS.add(name, who, False, describe(exc))
        await iso(f"after {name}")

    await iso("at the start")
    await feature("prepared", async_prepared)
    await feature("error_in_transaction", async_error_in_transaction)
    await feature("server_cursor", async_server_cursor)
    if problems:
        RESULTS.add("isolation", who, False, f"{len(problems)}/{checks} checks wrong, first: {problems[0]}")
    else:
        RESULTS.add("isolation", who, True, f"{checks} checks")


async def main_async():
    from sqlalchemy.ext.asyncio import create_async_engine

    engines = {
        t: create_async_engine(
            url(t), pool_size=POOL_SIZE, max_overflow=0, pool_timeout=30,
            connect_args={"ssl": PGSSLMODE, "timeout": 10})
        for t in ("north", "south")
    }
    try:
        async with engines["north"].connect() as c:
            await c.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        fail_early(f"cannot connect to {PGHOST}:{PGPORT}/{PGDATABASE}: {describe(exc)}")
    tasks = [asyncio.create_task(async_worker(i, engines)) for i in range(CLIENTS)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining()))
    emit(CLIENTS)
    if pending:
        print(f"{DRIVER}: deadline of {DEADLINE:g}s reached, unfinished work abandoned", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)
    for e in engines.values():
        await e.dispose()


if __name__ == "__main__":
    if FLAVOUR == "psycopg":
        main_sync()
    else:
        asyncio.run(main_async())
