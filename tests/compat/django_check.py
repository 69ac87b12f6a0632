#!/usr/bin/env python3
"""Compatibility driver for Django (ORM and raw cursors, psycopg 3 backend) against rlsgate (run
by tests/compat.rs via run.sh).

Settings are configured in-script (settings.configure): one database alias per tenant and
variant, all with CONN_MAX_AGE = 60 (persistent connections across request cycles):
  <tenant>         DISABLE_SERVER_SIDE_CURSORS = False (Django's default)
  <tenant>_nossc   DISABLE_SERVER_SIDE_CURSORS = True (what Django's docs suggest for PgBouncer
                   in transaction mode)
  <tenant>_prep    OPTIONS server_side_binding + prepare_threshold = 5 (Django turns psycopg's
                   automatic prepared statements off unless asked)
Every alias starts its connections with TimeZone=UTC (libpq options "-c TimeZone=UTC"): with
USE_TZ Django otherwise calls set_config('TimeZone', 'UTC', false) whenever the server's time
zone is not spelled "UTC", and the hardened schema revokes set_config from PUBLIC.
The demo tables are read through an unmanaged model. COMPAT_CLIENTS worker threads (tenants
alternating) each run request cycles; features: isolation, prepared, session_settings,
error_in_transaction, server_cursor. Environment and output as in README.md.
"""

import json
import os
import sys
import threading
import time
import uuid

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

DRIVER = "django"
FEATURES = ["isolation", "prepared", "session_settings", "error_in_transaction", "server_cursor"]
RUNS = 20
CYCLES = 3


def fail_early(msg):
    print(f"{DRIVER}: {msg}", file=sys.stderr)
    sys.exit(2)


try:
    import django
    from django.conf import settings
except ImportError as exc:  # pragma: no cover - environment problem
    fail_early(f"cannot import django ({exc}); run tests/compat/install.sh")


def database(tenant, **extra):
    # With USE_TZ Django wants the connection in UTC and otherwise calls
    # set_config('TimeZone', 'UTC', false) at connect, which the hardened demo schema refuses
    # (EXECUTE on set_config is revoked from PUBLIC). Asking for UTC at startup avoids the call.
    options = {"sslmode": PGSSLMODE, "connect_timeout": 10, "options": "-c TimeZone=UTC"}
    options.update(extra.pop("OPTIONS", {}))
    return {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": PGHOST,
        "PORT": str(PGPORT),
        "NAME": PGDATABASE,
        "USER": USERS[tenant],
        "PASSWORD": TOKENS[tenant],
        "CONN_MAX_AGE": 60,
        "OPTIONS": options,
        **extra,
    }


DATABASES = {"default": database("north")}
for _t in ("north", "south"):
    DATABASES[_t] = database(_t, DISABLE_SERVER_SIDE_CURSORS=False)
    DATABASES[f"{_t}_nossc"] = database(_t, DISABLE_SERVER_SIDE_CURSORS=True)
    DATABASES[f"{_t}_prep"] = database(_t, OPTIONS={"server_side_binding": True, "prepare_threshold": 5})

settings.configure(
    DEBUG=False,
    USE_TZ=True,
    TIME_ZONE="UTC",
    INSTALLED_APPS=[],
    DATABASES=DATABASES,
    LOGGING_CONFIG=None,
)
django.setup()

from django.db import DatabaseError, close_old_connections, connections, models, transaction  # noqa: E402
from django.core.signals import request_finished, request_started  # noqa: E402


class Customer(models.Model):
    customer_id = models.BigAutoField(primary_key=True)
    store_id = models.TextField()
    name = models.TextField()
    email = models.TextField(null=True)

    class Meta:
        app_label = "compat"
        managed = False
        db_table = "customers"


RESULTS = Results(FEATURES)


class Rollback(Exception):
    """Raised to leave atomic() so that it rolls back."""


def sqlstate(exc):
    cause = exc.__cause__ or exc
    return getattr(cause, "sqlstate", None)


def describe(exc):
    code = sqlstate(exc)
    msg = str(exc).strip().splitlines()
    msg = msg[0] if msg else type(exc).__name__
    return f"{type(exc).__name__} {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"


def new_email(tenant):
    return f"django-{uuid.uuid4().hex[:12]}@{tenant}.example"


def in_range(tenant, v):
    return sum(1 for i in CUSTOMER_IDS[tenant] if i <= v)


def check_tenant(alias, tenant, where):
    """ORM and raw-cursor views of the tenant through `alias`; None when right."""
    qs = Customer.objects.using(alias)
    n = qs.count()
    stores = sorted(set(qs.values_list("store_id", flat=True)))
    ids = set(qs.values_list("customer_id", flat=True))
    other = qs.filter(pk=4 if tenant == "north" else 1).exists()
    with connections[alias].cursor() as cur:
        cur.execute("SELECT count(*), coalesce(string_agg(DISTINCT store_id, ','), '') FROM customers")
        raw = tuple(cur.fetchone())
    want = EXPECTED_CUSTOMERS[tenant]
    if n != want or stores != [tenant] or ids != CUSTOMER_IDS[tenant] or other or raw != (want, tenant):
        return (f"{where} via {alias}: ORM saw {n} customers {sorted(ids)} of stores {stores}, other "
                f"tenant's customer {'visible' if other else 'hidden'}; raw cursor saw {raw}")
    return None


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------

def do_prepared(tenant):
    alias = f"{tenant}_prep"
    prepared = 0
    for k in range(RUNS):
        v = k % 7
        if k % 5 == 4:
            with transaction.atomic(using=alias):
                got = Customer.objects.using(alias).filter(customer_id__lte=v).count()
                if k % 10 == 9:
                    transaction.set_rollback(True, using=alias)
        else:
            got = Customer.objects.using(alias).filter(customer_id__lte=v).count()
        assert got == in_range(tenant, v), f"run {k}: count for id <= {v} is {got}, expected {in_range(tenant, v)}"
        # psycopg forgets its prepared statements at a ROLLBACK, so look after every run.
        prepared = max(prepared, len(connections[alias].connection._prepared._names))
    assert prepared > 0, "psycopg prepared nothing with prepare_threshold = 5"
    # The default alias keeps Django's default (prepare_threshold None): nothing is prepared.
    for _ in range(8):
        Customer.objects.using(tenant).filter(customer_id__lte=3).count()
    default = len(connections[tenant].connection._prepared._names)
    assert default == 0, f"{default} statements prepared although Django's default disables it"
    return (f"{RUNS} ORM queries with server_side_binding and prepare_threshold 5 (prepared "
            f"server-side, some in atomic() blocks, some rolled back) correct; default alias prepares nothing")


def do_session_settings(tenant):
    """CONN_MAX_AGE: one connection serves several request cycles; the time zone it started with
    (TimeZone=UTC, so Django's USE_TZ check needs no set_config) holds in each of them."""
    alias = tenant
    first = None
    for cycle in range(CYCLES):
        request_started.send(sender=None)
        conn = connections[alias]
        conn.ensure_connection()
        if first is None:
            first = conn.connection
        assert conn.connection is first, f"cycle {cycle}: Django reconnected although CONN_MAX_AGE is 60"
        with conn.cursor() as cur:
            cur.execute("SHOW TimeZone")
            tz = cur.fetchone()[0]
            cur.execute("SELECT now()::text")
            now = cur.fetchone()[0]
        assert tz == "UTC", f"cycle {cycle}: SHOW TimeZone = {tz}, expected UTC (the connection's startup option)"
        assert now.endswith("+00"), f"cycle {cycle}: now() = {now}, not in UTC"
        problem = check_tenant(alias, tenant, f"request cycle {cycle}")
        assert problem is None, problem
        request_finished.send(sender=None)
        time.sleep(0.05)
    return f"CONN_MAX_AGE = 60: one connection for {CYCLES} request cycles, TimeZone UTC in each"


def do_error_in_transaction(tenant):
    alias = tenant
    before = Customer.objects.using(alias).count()
    try:
        with transaction.atomic(using=alias):
            Customer.objects.using(alias).create(store_id=tenant, name="Django rollback", email=new_email(tenant))
            inside = Customer.objects.using(alias).count()
            assert inside == before + 1, f"inside atomic() the new row is not visible ({inside})"
            with connections[alias].cursor() as cur:
                try:
                    cur.execute("SELECT 1/0")
                    raise AssertionError("SELECT 1/0 did not fail")
                except DatabaseError as exc:
                    assert sqlstate(exc) == "22012", f"SELECT 1/0: {describe(exc)}"
                try:
                    cur.execute("SELECT 1")
                    raise AssertionError("statement after the error did not fail")
                except DatabaseError as exc:
                    assert sqlstate(exc) == "25P02", f"after the error: {describe(exc)}"
            raise Rollback()
    except Rollback:
        pass
    after = Customer.objects.using(alias).count()
    assert after == before, f"after atomic() rolled back: {after} customers, expected {before}"
    with transaction.atomic(using=alias):
        Customer.objects.using(alias).create(store_id=tenant, name="Django rollback 2", email=new_email(tenant))
        transaction.set_rollback(True, using=alias)
    after = Customer.objects.using(alias).count()
    assert after == before, f"after set_rollback(True): {after} customers, expected {before}"
    return "atomic(): insert, 22012, 25P02, rolled back; set_rollback(True): write undone"


def iterate(alias, tenant):
    """Customer ids through QuerySet.iterator(chunk_size=1), and the kinds of psycopg cursor the
    queries ran on."""
    kinds = set()

    def spy(execute, sql, params, many, context):
        kinds.add(type(context["cursor"].cursor).__name__)
        return execute(sql, params, many, context)

    ids = []
    with connections[alias].execute_wrapper(spy):
        for c in Customer.objects.using(alias).order_by("pk").iterator(chunk_size=1):
            ids.append(c.customer_id)
            time.sleep(0.01)  # other clients' transactions run meanwhile
    return ids, kinds


def do_server_cursor(tenant):
    want = sorted(CUSTOMER_IDS[tenant])
    # DISABLE_SERVER_SIDE_CURSORS = True: iterator() fetches client-side, also outside atomic().
    alias = f"{tenant}_nossc"
    ids, kinds = iterate(alias, tenant)
    assert kinds == {"Cursor"}, f"{alias}: iterator() ran on {kinds}, expected a client-side Cursor"
    assert ids == want, f"{alias}: iterator() gave {ids}"
    # Server-side cursors left on: inside atomic() the named cursor lives in the transaction.
    alias = tenant
    with transaction.atomic(using=alias):
        ids, kinds = iterate(alias, tenant)
    assert kinds == {"ServerSideCursor"}, f"{alias}: iterator() inside atomic() ran on {kinds}, not a server-side cursor"
    assert ids == want, f"{alias}: server-side iterator() in atomic() gave {ids}"
    return "DISABLE_SERVER_SIDE_CURSORS: iterator() client-side; server-side cursor inside atomic(): tenant's rows only"


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

def worker(i):
    tenant = "north" if i % 2 == 0 else "south"
    who = f"worker {i} ({tenant})"
    checks, problems = 0, []

    def iso(where):
        nonlocal checks
        for alias in (tenant, f"{tenant}_nossc"):
            checks += 1
            try:
                p = check_tenant(alias, tenant, where)
            except Exception as exc:  # noqa: BLE001
                p = f"{where} via {alias}: {describe(exc)}"
                close_old_connections()
            if p:
                problems.append(p)

    def feature(name, fn):
        try:
            RESULTS.add(name, who, True, fn(tenant))
        except AssertionError as exc:
            RESULTS.add(name, who, False, str(exc))
        except Exception as exc:  # noqa: BLE001
            RESULTS.add(name, who, False, describe(exc))
        iso(f"after {name}")

    try:
        iso("at the start")
        feature("session_settings", do_session_settings)
        feature("prepared", do_prepared)
        feature("error_in_transaction", do_error_in_transaction)
        feature("server_cursor", do_server_cursor)
    finally:
        if problems:
            RESULTS.add("isolation", who, False, f"{len(problems)}/{checks} checks wrong, first: {problems[0]}")
        else:
            RESULTS.add("isolation", who, True, f"{checks} checks")
        connections.close_all()


def remaining():
    return DEADLINE - (time.monotonic() - START)


def main():
    try:
        with connections["north"].cursor() as cur:
            cur.execute("SELECT 1")
        connections.close_all()
    except Exception as exc:  # noqa: BLE001
        fail_early(f"cannot connect to {PGHOST}:{PGPORT}/{PGDATABASE}: {describe(exc)}")
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, remaining()))
    timed_out = any(t.is_alive() for t in threads)
    for f in FEATURES:
        ok, detail = RESULTS.summary(f, CLIENTS)
        print(json.dumps({"driver": DRIVER, "feature": f, "ok": ok, "detail": detail}), flush=True)
    if timed_out:
        print(f"{DRIVER}: deadline of {DEADLINE:g}s reached, unfinished work abandoned", file=sys.stderr)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
