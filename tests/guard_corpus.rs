//! Adversarial corpus for the tenant-escape guard, through the real proxy and a real Postgres.
//!
//! Pool of size 1: both tenants share one server connection, so anything a denied statement
//! managed to change would show up for the other tenant. `set_config` is granted to the app role
//! in this database so that only the guard stands between a client and the tenant setting.

mod support;

use support::*;
use tokio_postgres::Client;

/// (expected SQLSTATE, statement)
const DENY: &[(&str, &str)] = &[
    ("42501", "SET app.current_store_id = 'south'"),
    ("42501", "SET SESSION app.current_store_id = 'south'"),
    ("42501", "SET LOCAL app.current_store_id = 'south'"),
    ("42501", "SET app.current_store_id TO DEFAULT"),
    ("42501", "SET app.current_store_id FROM CURRENT"),
    ("42501", "RESET app.current_store_id"),
    ("42501", "set app.CURRENT_STORE_ID = 'south'"),
    ("42501", "SET \"app\".\"current_store_id\" = 'south'"),
    ("42501", "SET \"APP\".\"CURRENT_STORE_ID\" = 'south'"),
    ("42501", "SET \"app.current_store_id\" = 'south'"),
    ("42501", "SET U&\"\\0061pp\".current_store_id = 'south'"),
    ("42501", "SET /* c */ app . current_store_id = 'south'"),
    ("42501", "SET\n\tapp.current_store_id\n=\n'south'"),
    (
        "42501",
        "/* leading */ SET app.current_store_id='south' -- trailing",
    ),
    ("42501", "SET app.current_store_id = south"),
    ("42501", "SET app.current_store_id TO 'south'"),
    ("42501", "SET SESSION app.current_store_id TO 'south'"),
    ("42501", "SET app.user_id = 'someone-else'"),
    ("42501", "SET app.brand_new_setting = 'x'"),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT pg_catalog.set_config('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT \"set_config\"('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT PG_CATALOG.SET_CONFIG('app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('APP.CURRENT_STORE_ID', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(' app.current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config('app.' || 'current_store_id', 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config($$app.current_store_id$$, 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config($x$app.current_store_id$x$, 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(E'app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config(U&'app.current\\005fstore_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id'::text, 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config('app.current_store_id' COLLATE \"C\", 'south', true)",
    ),
    (
        "42501",
        "SELECT set_config(format('%s.current_store_id', 'app'), 'south', false)",
    ),
    (
        "42501",
        "SELECT set_config(lower('APP.CURRENT_STORE_ID'), 'south', false)",
    ),
    ("42501", "SELECT set_config(NULL, 'south', true)"),
    (
        "42501",
        "SELECT set_config(name, 'south', false) FROM (VALUES ('app.current_store_id')) v(name)",
    ),
    (
        "42501",
        "SELECT set_config(current_setting('app.current_store_id'), 'x', true)",
    ),
    (
        "42501",
        "SELECT count(*) FROM customers WHERE set_config('app.current_store_id', 'south', true) IS NOT NULL",
    ),
    (
        "42501",
        "WITH x AS (SELECT set_config('app.current_store_id', 'south', true)) SELECT * FROM x",
    ),
    (
        "42501",
        "WITH x AS MATERIALIZED (SELECT 1) SELECT set_config('app.current_store_id', 'south', true) FROM x",
    ),
    (
        "42501",
        "EXPLAIN ANALYZE SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "EXPLAIN (ANALYZE, BUFFERS) SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "CREATE TABLE evil AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT * FROM set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT (SELECT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT 1 WHERE EXISTS (SELECT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "VALUES (set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT array_agg(set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT CASE WHEN true THEN set_config('app.current_store_id', 'south', true) END",
    ),
    (
        "42501",
        "SELECT coalesce(NULL, set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT xmlelement(name x, set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "SELECT row_to_json(t) FROM (SELECT set_config('app.current_store_id', 'south', true)) t",
    ),
    (
        "42501",
        "UPDATE customers SET name = name WHERE set_config('app.current_store_id', 'south', true) <> ''",
    ),
    (
        "42501",
        "INSERT INTO customers (store_id, name) SELECT 'north', set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "DELETE FROM customers WHERE set_config('app.current_store_id', 'south', true) = 'x'",
    ),
    (
        "42501",
        "COPY (SELECT set_config('app.current_store_id', 'south', true)) TO STDOUT",
    ),
    (
        "42501",
        "PREPARE p AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "PREPARE p2(text) AS SELECT set_config($1, 'south', true)",
    ),
    (
        "42501",
        "DECLARE c CURSOR FOR SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "SELECT query_to_xml('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml($q$select set_config('app.current_store_id','south',true)$q$, true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('select ' || 'set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml(repeat('x', 1), true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xmlschema('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml_and_xmlschema('select set_config(''app.current_store_id'',''south'',true)', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('select query_to_xml(''select set_config(''''app.current_store_id'''',''''south'''',true)'', true, true, '''')', true, true, '')",
    ),
    (
        "42501",
        "SELECT query_to_xml('DO $$ BEGIN PERFORM 1; END $$', true, true, '')",
    ),
    (
        "42501",
        "SELECT ts_stat('select set_config(''app.current_store_id'',''south'',true)::tsvector')",
    ),
    (
        "42501",
        "SELECT table_to_xml(('cust' || 'omers')::regclass, true, true, '')",
    ),
    (
        "42501",
        "SELECT cursor_to_xml(c::refcursor, 1, true, true, '') FROM (VALUES ('c')) v(c)",
    ),
    (
        "42501",
        "SELECT dblink('dbname=postgres', 'select set_config(''app.current_store_id'',''south'',false)')",
    ),
    ("42501", "SELECT dblink_exec('dbname=postgres', 'select 1')"),
    (
        "42501",
        "DO $$ BEGIN PERFORM set_config('app.current_store_id', 'south', true); END $$",
    ),
    ("42501", "DO $$ BEGIN NULL; END $$"),
    (
        "42501",
        "DO LANGUAGE plpgsql $$ BEGIN EXECUTE 'SET app.current_store_id = ''south'''; END $$",
    ),
    (
        "42501",
        "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$ SELECT set_config('app.current_store_id', 'south', true) $$",
    ),
    (
        "42501",
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
    ),
    ("42501", "CREATE PROCEDURE p() LANGUAGE sql AS 'select 1'"),
    (
        "42501",
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql SET app.current_store_id = 'south' AS 'select 1'",
    ),
    ("42501", "SET ROLE postgres"),
    ("42501", "SET ROLE NONE"),
    ("42501", "RESET ROLE"),
    ("42501", "SET LOCAL ROLE rlsgate_owner"),
    ("42501", "SET \"role\" = 'rlsgate_owner'"),
    ("42501", "SET SESSION AUTHORIZATION postgres"),
    ("42501", "SET SESSION AUTHORIZATION DEFAULT"),
    ("42501", "RESET SESSION AUTHORIZATION"),
    ("42501", "SET session_authorization = 'postgres'"),
    ("42501", "SELECT set_config('role', 'rlsgate_owner', false)"),
    (
        "42501",
        "SELECT set_config('session_authorization', 'postgres', false)",
    ),
    (
        "42501",
        "ALTER ROLE rlsgate_app SET app.current_store_id = 'south'",
    ),
    ("42501", "ALTER ROLE ALL SET app.current_store_id = 'south'"),
    (
        "42501",
        "ALTER ROLE rlsgate_app IN DATABASE postgres SET app.current_store_id = 'south'",
    ),
    (
        "42501",
        "ALTER DATABASE postgres SET app.current_store_id = 'south'",
    ),
    (
        "42501",
        "ALTER DATABASE postgres RESET app.current_store_id",
    ),
    ("42501", "ALTER SYSTEM SET app.current_store_id = 'south'"),
    ("42501", "LOAD 'plpgsql'"),
    ("42501", "SET standard_conforming_strings = off"),
    ("42501", "SET backslash_quote = on"),
    ("42501", "SET client_encoding = 'SJIS'"),
    (
        "42501",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
    ),
    (
        "42501",
        "CREATE VIEW v AS SELECT set_config('app.current_store_id', 'south', true)",
    ),
    (
        "42501",
        "CREATE TABLE t (x text DEFAULT set_config('app.current_store_id', 'south', true))",
    ),
    (
        "42501",
        "CREATE RULE r AS ON INSERT TO customers DO ALSO SELECT set_config('app.current_store_id', 'south', true)",
    ),
    ("42501", "SELECT 1; SET app.current_store_id = 'south'"),
    (
        "42501",
        "SET app.current_store_id = 'south'; SELECT count(*) FROM customers",
    ),
    (
        "42501",
        "BEGIN; SET LOCAL app.current_store_id = 'south'; SELECT count(*) FROM customers; COMMIT",
    ),
    (
        "42501",
        "SELECT 1; COMMIT; SELECT set_config('app.current_store_id', 'south', false)",
    ),
    ("42501", "SELECT 1; RESET ALL"),
    ("42501", "DISCARD ALL; SELECT 1"),
    (
        "42501",
        "SELECT set_config('app.current_store_id', 'south', false) SELECT",
    ),
    ("0A000", "LISTEN channel_a"),
    ("0A000", "CREATE TEMP TABLE scratch (x int)"),
    ("0A000", "CREATE TEMPORARY VIEW tv AS SELECT 1"),
    ("0A000", "DECLARE hc CURSOR WITH HOLD FOR SELECT 1"),
    ("0A000", "PREPARE q AS SELECT 1"),
    ("0A000", "SELECT pg_advisory_lock(42)"),
    ("0A000", "SELECT pg_try_advisory_lock_shared(42)"),
];

/// Ordinary SQL an ORM or a person sends; must reach the server.
const ALLOW: &[&str] = &[
    "SET search_path = public",
    "SET search_path TO \"$user\", public",
    "SET TimeZone = 'UTC'",
    "SET TIME ZONE 'Europe/Paris'",
    "SET statement_timeout = '5s'",
    "SET application_name = 'my-app'",
    "SET SESSION statement_timeout TO 1000",
    "SET LOCAL statement_timeout = 1000",
    "SET client_encoding = 'UTF8'",
    "SET datestyle = 'ISO, MDY'",
    "SET extra_float_digits = 3",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "RESET statement_timeout",
    "RESET search_path",
    "SELECT set_config('search_path', 'public', false)",
    "SELECT set_config('statement_timeout', '1000', true)",
    "SELECT set_config('application_name', 'orm', false)",
    "SHOW search_path",
    "SHOW app.current_store_id",
    "SELECT current_setting('app.current_store_id')",
    "SELECT current_setting('app.current_store_id', true)",
    "WITH c AS (SELECT * FROM customers) SELECT count(*) FROM c",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT sum(n) FROM r",
    "SELECT now(), lower('X'), length('abc')",
    "SELECT * FROM customers ORDER BY customer_id LIMIT 2",
    "TABLE stores",
    "EXPLAIN SELECT * FROM customers",
    "EXPLAIN ANALYZE SELECT count(*) FROM customers",
    "EXPLAIN (FORMAT JSON) SELECT * FROM products WHERE price > 1",
    "SELECT query_to_xml('select 1 as one', true, true, '')",
    "SELECT table_to_xml('stores'::regclass, true, true, '')",
    "SELECT 'SET app.current_store_id = ''south''' AS harmless_text",
    "SELECT count(*) FROM customers WHERE name = 'set_config(''app.current_store_id'',''south'',true)'",
    "SELECT 1 AS \"app.current_store_id\"",
    "SELECT pg_advisory_xact_lock(7)",
    "DISCARD PLANS",
    "DISCARD SEQUENCES",
    "RESET ALL",
    "DISCARD ALL",
    "SELECT version()",
    "SELECT p.name, sum(i.quantity) FROM sales_items i JOIN products p USING (product_id) GROUP BY 1",
    "INSERT INTO customers (store_id, name) VALUES ('north', 'Allowed Insert'); \
     UPDATE customers SET email = 'x@north.example' WHERE name = 'Allowed Insert'; \
     DELETE FROM customers WHERE name = 'Allowed Insert'",
    "SELECT 1; SELECT 2",
    "BEGIN; SELECT count(*) FROM customers; COMMIT",
    "START TRANSACTION READ ONLY; SELECT 1; ROLLBACK",
    "VACUUM customers",
    "ANALYZE customers",
    "CALL nonexistent_procedure_is_a_postgres_error_not_a_denial()",
];

async fn assert_context(north: &Client, south: &Client, case: &str) {
    let row = north
        .query_one("SELECT current_setting('app.current_store_id'), (SELECT count(*) FROM customers), (SELECT count(*) FROM customers WHERE store_id = 'south')", &[])
        .await
        .unwrap_or_else(|e| panic!("north after {case:?}: {e}"));
    assert_eq!(row.get::<_, String>(0), "north", "after {case:?}");
    assert_eq!(row.get::<_, i64>(1), 3, "after {case:?}");
    assert_eq!(
        row.get::<_, i64>(2),
        0,
        "south rows visible to north after {case:?}"
    );
    let row = south
        .query_one(
            "SELECT current_setting('app.current_store_id'), (SELECT count(*) FROM customers)",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("south after {case:?}: {e}"));
    assert_eq!(row.get::<_, String>(0), "south", "after {case:?}");
    assert_eq!(row.get::<_, i64>(1), 2, "after {case:?}");
}

async fn corpus_proxy() -> Proxy {
    let db = demo_db();
    admin_sql(
        &db,
        "GRANT EXECUTE ON FUNCTION pg_catalog.set_config(text, text, boolean) TO rlsgate_app",
    );
    let cfg = config_text(&db, 1, "").replace("[upstream]", "session_state = \"deny\"\n[upstream]");
    start_proxy_with(&db, &cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_escape_in_the_corpus_is_denied_and_changes_nothing() {
    assert!(DENY.len() + ALLOW.len() >= 100);
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for (want, sql) in DENY {
        let err = north
            .simple_query(sql)
            .await
            .err()
            .unwrap_or_else(|| panic!("simple {sql:?} was allowed"));
        assert_eq!(code(&err), *want, "simple {sql:?}: {err}");
        assert!(
            message(&err).starts_with("rlsgate:"),
            "simple {sql:?} must be refused by rlsgate: {err}"
        );
        // extended protocol (Parse of a named statement)
        let err = north
            .query(*sql, &[])
            .await
            .err()
            .unwrap_or_else(|| panic!("extended {sql:?} was allowed"));
        assert_eq!(code(&err), *want, "extended {sql:?}: {err}");
        assert_context(&north, &south, sql).await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordinary_sql_still_works() {
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for sql in ALLOW {
        match north.simple_query(sql).await {
            Ok(_) => {}
            Err(e) => {
                assert!(
                    !message(&e).starts_with("rlsgate:"),
                    "{sql:?} was refused by rlsgate: {e}"
                );
                assert_eq!(code(&e), "42883", "{sql:?} failed: {e}");
            }
        }
        assert_context(&north, &south, sql).await;
    }
    // single statements also through the extended protocol
    for sql in ALLOW
        .iter()
        .filter(|s| !s.contains(';') && !s.starts_with("VACUUM") && !s.starts_with("CALL"))
    {
        if let Err(e) = north.query(*sql, &[]).await {
            panic!("extended {sql:?}: {e}");
        }
    }
    assert_context(&north, &south, "extended allow list").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denial_inside_a_transaction_fails_it_like_a_postgres_error() {
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    for (_, sql) in DENY.iter().take(40) {
        north.batch_execute("BEGIN").await.unwrap();
        assert_eq!(count(&north, "customers").await, 3);
        let err = north.simple_query(sql).await.unwrap_err();
        assert!(message(&err).starts_with("rlsgate:"), "{sql}: {err}");
        let err = north.simple_query("SELECT 1").await.unwrap_err();
        assert_eq!(
            code(&err),
            "25P02",
            "after {sql:?} the transaction must be aborted: {err}"
        );
        north.batch_execute("ROLLBACK").await.unwrap();
        assert_context(&north, &south, sql).await;
    }
    // RESET ALL may not clear the context mid-transaction
    north.batch_execute("BEGIN").await.unwrap();
    let err = north.simple_query("RESET ALL").await.unwrap_err();
    assert_eq!(code(&err), "42501", "{err}");
    north.batch_execute("ROLLBACK").await.unwrap();
    assert_context(&north, &south, "RESET ALL in a transaction").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_inside_pipelines_leave_the_other_requests_intact() {
    use futures_util::future::join_all;
    let proxy = corpus_proxy().await;
    let north = client(&proxy, "north").await;
    let south = client(&proxy, "south").await;
    let futs = (0..30).map(|i| {
        let north = &north;
        async move {
            if i % 3 == 0 {
                north
                    .query(
                        "SELECT set_config('app.current_store_id', 'south', true)",
                        &[],
                    )
                    .await
                    .map(|_| -1)
            } else {
                north
                    .query_one("SELECT count(*) FROM customers", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0))
            }
        }
    });
    for (i, r) in join_all(futs).await.into_iter().enumerate() {
        match r {
            Ok(n) => assert_eq!((i % 3 != 0, n), (true, 3), "request {i}"),
            Err(e) => assert_eq!(
                (i % 3, code(&e)),
                (0, "42501".to_string()),
                "request {i}: {e}"
            ),
        }
    }
    assert_context(&north, &south, "pipeline").await;
    proxy.stop().await;
}
